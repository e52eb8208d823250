"""Synaptic Intelligence (Zenke, Poole & Ganguli, ICML 2017)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from metagate.methods.base import METHODS, BaseMethodConfig, Method
from metagate.methods.stabilizers import SIStabilizer


@METHODS.register("si")
class SI(Method):
    """SI: every parameter accumulates, along its training trajectory, the path integral
    ``w_k = -sum_steps g_k * delta_theta_k`` with ``g`` the gradient of the *unregularised* task loss
    and ``delta_theta`` the optimiser's actual update (paper, eq. 3). After task t its importance becomes
    ``Omega_k = relu(Omega_k + w_k / (Delta_k^2 + xi))`` with ``Delta_k`` the parameter's total change
    over the task (eq. 5; the ReLU of the sum as in the authors' code, ganguli-lab/pathint
    ``pathint/protocols.py``, ``PATH_INT_PROTOCOL``), ``w`` resets, and later tasks add
    ``c * sum_k Omega_k (theta_k - theta~_k)^2`` (eq. 4, ``pathint/regularizers.py``) with the anchor
    ``theta~`` at the end of the previous task.

    Defaults from the paper's permuted-MNIST setting: ``c = 0.1``, ``xi = 0.1`` (split MNIST used
    ``c = 1``, ``xi = 1e-3``), and Adam's state kept across tasks (``reset_optimizer = False``) as the
    authors' permuted-MNIST notebook does (``fig_permuted_mnist/Permuted MNIST.ipynb``:
    ``reset_optimizer = False``); their split-MNIST notebook resets it (``reset_optimizer = True``), so
    set it for that setting. Supports task-, domain- and class-incremental streams.
    """

    class Config(BaseMethodConfig):
        name: Literal["si"] = "si"
        c: float = Field(0.1, ge=0, description="penalty strength")
        xi: float = Field(0.1, gt=0, description="damping")
        reset_optimizer: bool = Field(
            False, description="fresh optimiser state at every task (pathint: no on permuted MNIST, yes on split MNIST)"
        )

    name = "si"

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.set_stabilizer(SIStabilizer(self.model, self.cfg.c, self.cfg.xi))  # type: ignore[attr-defined]
