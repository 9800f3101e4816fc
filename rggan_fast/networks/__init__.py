"""Network definitions per architecture (only SNGAN is built so far)."""
from . import sngan

__all__ = ["sngan"]
