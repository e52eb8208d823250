"""Online EWC (Schwarz et al., "Progress & Compress", ICML 2018)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from metagate.methods.base import METHODS
from metagate.methods.ewc import EWC


@METHODS.register("online_ewc")
class OnlineEWC(EWC):
    """Online EWC: one running Fisher ``F*_t = gamma * F*_{t-1} + F_t`` (paper, eq. 9) and one anchor,
    the parameters after the latest task; while training task t the loss is
    ``L + lambda/2 * sum_k gamma F*_{t-1,k} (theta_k - theta*_{t-1,k})^2`` (eq. 8: the penalty's
    Fisher is ``gamma F*_{t-1}``, so the latest task's Fisher is decayed once too). ``gamma = 1`` is
    plain accumulation. Fisher estimated as in :class:`~metagate.methods.ewc.EWC`. Supports task-,
    domain- and class-incremental streams.
    """

    class Config(EWC.Config):
        name: Literal["online_ewc"] = "online_ewc"  # type: ignore[assignment]
        gamma: float = Field(1.0, ge=0, le=1, description="decay of the running Fisher (eq. 8-9)")

    name = "online_ewc"
    online = True
