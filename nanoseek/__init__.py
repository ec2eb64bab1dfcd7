"""nanoseek: DeepSeek-V3 + R1, small enough to read in an afternoon."""

import os

# OpenMP threads that spin at barriers lose ~4x (up to 40x) of throughput as soon as another process takes a core
# of a small machine (LOG.md: 30 fp32 pretrain steps on 2 threads under load: 251 s spinning, 61 s passive). Must be
# set before torch loads its OpenMP runtime; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"


def load(path, **kw):
    """Load an HF DeepseekV3 checkpoint directory (or a nanoseek one) as a nanoseek model."""
    from nanoseek.checkpoint import load as _load

    return _load(path, **kw)


def save(model, path, **kw):
    """Save a model in the official DeepSeek-V3 / HF layout, atomically."""
    from nanoseek.checkpoint import save as _save

    return _save(model, path, **kw)
