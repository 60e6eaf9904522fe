"""Drift monitoring: calibrated two-sample tests on UAE/BBSD embeddings, reports, dashboards."""
