"""cvops: on-premises MLOps for image classification, from one config and one command."""

__version__ = "0.1.0"
