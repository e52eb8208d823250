"""Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from metagate.methods.base import METHODS, BaseMethodConfig, Method
from metagate.methods.stabilizers import EWCStabilizer


@METHODS.register("ewc")
class EWC(Method):
    """EWC: after each task t, the diagonal Fisher ``F_t`` at the task's solution ``theta*_t``;
    while training later tasks the loss is ``L + lambda/2 * sum_t sum_k F_t,k (theta_k - theta*_t,k)^2``
    (paper, eq. 3, with one penalty per past task as the paper describes for a third task).

    The Fisher is the plain mean over ``fisher_samples`` training inputs of squared per-sample
    gradients of ``log p(y|x)``, with ``y`` drawn from the model's predictive distribution (the Fisher
    information as the paper defines it) or, with ``fisher_labels="true"``, the true label (empirical
    Fisher); dropout is off while it is estimated. The per-task penalties are folded into one
    importance/anchor pair with an exact constant (same value and gradient, constant memory; the paper
    notes that a sum of quadratic penalties is itself one). The paper gives no code and tunes
    ``lambda`` per problem: the default here was chosen on metagate's synthetic streams. Supports
    task-, domain- and class-incremental streams.
    """

    class Config(BaseMethodConfig):
        name: Literal["ewc"] = "ewc"
        lambda_: float = Field(100.0, ge=0, alias="lambda", description="penalty strength")
        fisher_samples: int = Field(1000, ge=1, description="training inputs used to estimate the Fisher")
        fisher_labels: Literal["sampled", "true"] = Field(
            "sampled", description="sampled: labels drawn from the model (true Fisher); true: empirical Fisher"
        )

    name = "ewc"
    online = False

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        c = self.cfg
        self.set_stabilizer(
            EWCStabilizer(
                self.model, self, c.lambda_, c.fisher_samples, c.fisher_labels,  # type: ignore[attr-defined]
                online=self.online, gamma=getattr(c, "gamma", 1.0),
            )
        )
