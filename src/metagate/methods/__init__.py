"""Continual-learning methods, one file each, registered by name."""

from metagate.methods.base import METHODS, Batch, Method, MethodReport, TrainingData, create_method
from metagate.methods import active_dendrites, ewc, finetune, hnet, hypermask, joint, metagate, nearest_context, online_ewc, oracle, pathnet, piggyback, si, xdg  # noqa: F401  (fill the registry)
from metagate.methods import factor_rule, ridge_context, stored_composition  # noqa: F401  (non-learned references, issue 25)
from metagate.methods import bir, dgr, er, mergan  # noqa: F401  (replay methods)
from metagate.methods import mark  # noqa: F401  (MARK)
from metagate.methods import hat, packnet, supsup, wsn  # noqa: F401  (parameter isolation)

__all__ = ["METHODS", "Batch", "Method", "MethodReport", "TrainingData", "create_method", "list_methods"]


def list_methods(pattern: str = "*") -> list[str]:
    return METHODS.names(pattern)
