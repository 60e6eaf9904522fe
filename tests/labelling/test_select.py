"""Selection strategies, the random control share, tag numbering and the labelling config."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest

from cvops.config import ConfigError, parse_config
from cvops.labelling.client import choice_result, chosen_label, label_config
from cvops.labelling.loop import newest_version_tag, next_tag
from cvops.labelling.select import RANDOM_ARM, STRATEGIES, random_count, select, uncertainty

PROBS = np.array(
    [
        [0.98, 0.01, 0.01],  # sure
        [0.50, 0.49, 0.01],  # two-way tie: smallest margin
        [0.34, 0.33, 0.33],  # flat: highest entropy
        [0.60, 0.20, 0.20],
    ]
)


def test_uncertainties_rank_as_their_definitions_say() -> None:
    assert np.argmax(uncertainty(PROBS, "least_confidence")) == 2
    assert np.argmax(uncertainty(PROBS, "margin")) == 1
    assert np.argmax(uncertainty(PROBS, "entropy")) == 2
    assert np.argmin(uncertainty(PROBS, "entropy")) == 0
    for kind in ("least_confidence", "margin", "entropy"):
        u = uncertainty(PROBS, kind)
        assert ((u >= 0) & (u <= 1 + 1e-9)).all()
    with pytest.raises(ValueError, match="unknown uncertainty"):
        uncertainty(PROBS, "bald")


def test_random_share_is_a_uniform_draw_before_the_strategy() -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=1000)
    sel = select(probs, 200, "entropy", random_share=0.1, seed=3)
    assert len(sel) == 200 and len(set(sel.indices.tolist())) == 200
    assert sel.arms.count(RANDOM_ARM) == 20 and sel.arms.count("entropy") == 180
    picked = sel.indices[np.array(sel.arms) == "entropy"]
    controls = sel.indices[np.array(sel.arms) == RANDOM_ARM]
    u = uncertainty(probs, "entropy")
    rest = np.setdiff1d(np.arange(1000), controls)
    # the strategy's picks are the most uncertain of what the control left
    assert set(picked.tolist()) == set(rest[np.argsort(-u[rest])[:180]].tolist())
    # the control is not biased towards uncertain rows
    assert abs(u[controls].mean() - u.mean()) < 0.1
    # same seed, same picks
    again = select(probs, 200, "entropy", random_share=0.1, seed=3)
    assert np.array_equal(again.indices, sel.indices)


def test_counts_and_edges() -> None:
    assert random_count(200, 0.1) == 20 and random_count(40, 0.1) == 4
    assert random_count(5, 0.1) == 1 and random_count(5, 0.0) == 0
    assert len(select(PROBS, 10, "margin")) == 4  # never more than the pool
    assert len(select(PROBS[:0], 10, "margin")) == 0
    only_random = select(PROBS, 3, "random", random_share=0.0)
    assert only_random.arms == [RANDOM_ARM] * 3
    with pytest.raises(ValueError, match="unknown strategy"):
        select(PROBS, 2, "coreset")
    assert set(STRATEGIES) == {"least_confidence", "margin", "entropy", "drift_weighted", "random"}


def test_drift_weighted_prefers_uncertain_images_unlike_the_reference() -> None:
    probs = np.array([[0.4, 0.3, 0.3], [0.4, 0.3, 0.3], [0.9, 0.05, 0.05]])
    scores = np.array([-1.0, 4.0, 4.0])  # row 1: as unsure as row 0, far from the reference
    sel = select(probs, 1, "drift_weighted", random_share=0.0, domain_scores=scores)
    assert sel.indices.tolist() == [1]
    with pytest.raises(ValueError, match="domain-classifier"):
        select(probs, 1, "drift_weighted", random_share=0.0)


def test_next_tag_numbering() -> None:
    assert next_tag("v2.0.0") == "v2.1.0"
    assert next_tag("v2.1.0", "patch") == "v2.1.1"
    assert next_tag("v2.1.3", "major") == "v3.0.0"
    assert next_tag("1.9.0") == "1.10.0"
    with pytest.raises(ValueError, match="not a version"):
        next_tag("latest")
    assert newest_version_tag(["v1.0.0", "v1.10.0", "v1.9.0", "nightly"]) == "v1.10.0"
    assert newest_version_tag(["nightly"]) is None


def test_label_config_lists_classes_and_unknown_once() -> None:
    xml = label_config(["cat", 'say "hi" & <go>'])
    root = ET.fromstring(xml)
    values = [c.get("value") for c in root.iter("Choice")]
    assert values == ["cat", 'say "hi" & <go>', "other / unknown"]
    assert root.find("Image").get("value") == "$image"
    assert [
        c.get("value") for c in ET.fromstring(label_config(["a", "other / unknown"])).iter("Choice")
    ] == ["a", "other / unknown"]
    assert chosen_label(choice_result("cat")) == "cat" and chosen_label([]) is None


def test_labelling_config_section() -> None:
    base = {
        "flow_module": "cvops.flows.full_flow",
        "model": {"model_name": "m", "input_size": {"w": 8, "h": 8}, "classes": ["a", "b"]},
    }
    cfg = parse_config(
        {**base, "labelling": {"strategy": "margin", "n": 40}}, check_flow_module=False
    )
    assert cfg.labelling.strategy == "margin" and cfg.labelling.random_share == 0.1
    with pytest.raises(ConfigError, match="labelling.unknown_class"):
        parse_config({**base, "labelling": {"unknown_class": "zzz"}}, check_flow_module=False)
    with pytest.raises(ConfigError, match="labelling.strategy"):
        parse_config({**base, "labelling": {"strategy": "best"}}, check_flow_module=False)
