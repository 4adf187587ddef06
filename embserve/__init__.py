"""embserve: the logic of an OpenAI-compatible embedding service, importable without Ray running."""

__version__ = "0.1.0"
