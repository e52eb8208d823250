"""An optional compiled training step (``trainer.compile=true``): ``torch.compile`` of the method's ``train_step``.

TorchDynamo traces the step in pieces where it can (the forward and its backward, the optimiser's update, a
stabiliser's per-tensor passes) and Inductor fuses each piece's elementwise work into generated kernels (C++
on CPU, Triton on CUDA); what does not trace (a host sync, data-dependent Python control flow) runs eagerly
between the pieces, so every method runs, compiled where it traces. The numbers are the eager step's up to
float rounding (fused kernels may round differently; random draws come from the eager generator, so replay
and dropout draw the same samples; ``tests/test_compile.py``).

The first steps pay for the compilation (tens of seconds on a CPU; Inductor caches its kernels on disk for
later runs), and the step recompiles where it meets what it has not seen: a new task (the task's index and
mask are constants of the trace), the last, shorter batch of an epoch (then sizes become dynamic). The
recompile limit is raised to cover a stream's tasks (a method that makes a new optimiser at every task, or
whose penalty switches on after the first, adds a trace each); past it a step falls back to eager (correct,
not compiled). Each run clears the process's trace cache when it starts (Inductor's disk cache stays). Off by default: it pays only where a run has many steps per task (``docs/speed.md`` has the
measurements per method).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

StepFn = Callable[..., Any]


def compile_step(step: StepFn, num_tasks: int) -> StepFn:
    """``step`` (a method's bound ``train_step``) under ``torch.compile``; ``num_tasks``: the tasks the step will
    train, each traced on its own (a few traces a task: its first batches, the shorter last batch of an epoch, a
    new optimiser, the penalty switching on)."""
    import torch._dynamo
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    # a run starts from an empty trace cache: runs one after another in a process (an inline sweep) would
    # otherwise pile their guards (each method instance, each optimiser) onto one cache and exhaust its limit
    torch._dynamo.reset()
    needed = 4 * num_tasks + 4
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name) and getattr(dynamo_config, name) < needed:
            setattr(dynamo_config, name, needed)
    inductor_config.fallback_random = True  # random draws (replay, dropout) from the eager generator: the same numbers
    if hasattr(dynamo_config, "allow_unspec_int_on_nn_module"):
        dynamo_config.allow_unspec_int_on_nn_module = True  # a method's step counters: inputs, not constants
    return torch.compile(step)
