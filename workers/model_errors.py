"""The one error of finding, fetching, converting and loading a model: a leaf module, so that
model_source, gguf_convert and model_loader share it without importing one another."""

from __future__ import annotations


class ModelLoadError(ValueError):
    """A model cannot be found, fetched, converted or loaded; the message says which and why."""
