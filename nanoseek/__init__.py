"""nanoseek: DeepSeek-V3 + R1, small enough to read in an afternoon."""

__version__ = "0.1.0"


def load(path, **kw):
    """Load an HF DeepseekV3 checkpoint directory (or a nanoseek one) as a nanoseek model."""
    from nanoseek.checkpoint import load as _load

    return _load(path, **kw)


def save(model, path, **kw):
    """Save a model in the official DeepSeek-V3 / HF layout, atomically."""
    from nanoseek.checkpoint import save as _save

    return _save(model, path, **kw)
