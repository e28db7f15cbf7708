"""Batch image annotation with OpenAI-compatible vision models: a manifest of images in,
a Parquet dataset of answers and usage out."""

__version__ = "0.1.0"
