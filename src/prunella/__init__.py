"""Prunella: one-shot pruning of causal language models, and where the sparsity goes."""

__version__ = "0.1.0"

from .api import evaluate, prune
from .errors import PrunellaError
from .export import save
from .models import load

__all__ = ["PrunellaError", "__version__", "evaluate", "load", "prune", "save"]
