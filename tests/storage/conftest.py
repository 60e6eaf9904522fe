"""Object-storage fixtures: a real S3 server process (moto) and a fresh bucket per test."""

from tests.s3 import s3_bucket, s3_server  # noqa: F401 - fixtures
