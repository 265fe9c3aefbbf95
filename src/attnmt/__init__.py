"""attnmt: a fast, correct, readable Transformer machine-translation trainer."""

__version__ = "0.1.0"
