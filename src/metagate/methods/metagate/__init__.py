"""metagate: masks generated from each task's context by a meta-agent (registered as ``metagate``).

``method`` holds the hooks (:class:`MetaGate` and its Config); ``agents`` the meta-agents; ``priors`` the scores
added to the agent's logits; ``contexts`` what the agent reads; ``window`` the windowed agent steps; ``few_shot``
the few-shot measurement. Design and measurements: ``docs/metagate.md``.
"""

from metagate.methods.metagate.agents import AdditiveAgent, MetaAgent
from metagate.methods.metagate.method import MetaGate

__all__ = ["AdditiveAgent", "MetaAgent", "MetaGate"]
