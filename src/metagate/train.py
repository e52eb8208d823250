"""The Trainer: tasks in order, batches by index over in-memory tensors, every task evaluated after
every task, a checkpoint after each task, resume from the last one.

Reads top to bottom: ``fit`` is the whole loop. It never knows which method it drives.
"""

from __future__ import annotations

import math
import random
import resource
import time
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from metagate import metrics
from metagate.config import ExperimentConfig
from metagate.data import build_stream
from metagate.data.stream import Stream, Task
from metagate.methods import Batch, Method, create_method
from metagate.runs import CheckpointError, RunDir, environment

# Trainer fields that may differ between a run and its resumption (they do not change the numbers).
RESUME_FREE_KEYS = ("device", "progress", "eval_batch_size", "checkpoint")


def run_identity(config: dict[str, Any]) -> dict[str, Any]:
    """What makes two configs the same run: all but the keys a resumed run may change and the
    ``reference`` (another run)."""
    trainer = {k: v for k, v in config.get("trainer", {}).items() if k not in RESUME_FREE_KEYS}
    return {**{k: v for k, v in config.items() if k != "reference"}, "trainer": trainer}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"trainer.device={name} but this machine has no CUDA device; use trainer.device=cpu or auto")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def task_seed(seed: int, task_index: int) -> int:
    """A seed per (run seed, task): each task's randomness is independent of how the run got there,
    so a resumed run draws the same batches and dropout masks as an uninterrupted one."""
    return (seed * 1_000_003 + task_index * 7919 + 1) % 2**63


@torch.no_grad()
def evaluate(method: Method, tasks: list[Task], batch_size: int) -> list[float]:
    """Accuracy on each task's test set (one host sync for all tasks)."""
    if not tasks:
        return []
    was_training = method.training
    method.eval()
    correct = []
    for task in tasks:
        hits = torch.zeros((), dtype=torch.long, device=task.y_test.device)
        for start in range(0, task.num_test, batch_size):
            x = task.x_test[start : start + batch_size]
            y = task.y_test[start : start + batch_size]
            hits += (method.predict(x, task).argmax(dim=1) == y).sum()
        correct.append(hits)
    method.train(was_training)
    counts = torch.stack(correct).cpu().tolist()
    return [c / t.num_test for c, t in zip(counts, tasks)]


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory: bytes allocated by torch on a CUDA device, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Trainer:
    """Drives one method through one stream for one config, writing into ``run`` (if given)."""

    def __init__(self, cfg: ExperimentConfig, run: RunDir | None = None) -> None:
        self.cfg = cfg
        self.run = run
        self.device = resolve_device(cfg.trainer.device)
        seed_everything(cfg.seed)
        self.stream: Stream = build_stream(cfg.benchmark, cfg.seed).to(self.device)
        torch.manual_seed(task_seed(cfg.seed, -1))
        self.method: Method = create_method(cfg.method, self.stream, cfg.trainer, self.device)

    # ----------------------------------------------------------------- state

    def _fresh_state(self) -> dict[str, Any]:
        return {
            "next_task": 0,
            "acc_rows": [],
            "heldout_rows": [],
            "initial_acc": evaluate(self.method, self.stream.tasks, self.cfg.trainer.eval_batch_size),
            "initial_heldout": evaluate(self.method, self.stream.heldout, self.cfg.trainer.eval_batch_size),
            "train_seconds": 0.0,
            "samples_seen": 0,
            "steps": 0,
            "curves": [],
        }

    def _load_state(self) -> dict[str, Any]:
        assert self.run is not None
        ckpt = self.run.load_checkpoint(self.device)
        saved, current = ckpt.get("config", {}), self.cfg.to_dict()
        if run_identity(saved) != run_identity(current):
            raise CheckpointError(
                f"checkpoint {self.run.checkpoint_path} was written by another config "
                f"(method {saved.get('method', {}).get('name')!r}, benchmark {saved.get('benchmark', {}).get('name')!r}, "
                f"seed {saved.get('seed')!r}); resume with the run's own config.yaml"
            )
        try:
            self.method.load_state_dict(ckpt["method_state"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"checkpoint {self.run.checkpoint_path} does not fit method {self.method.name!r}: {e}") from None
        self.run.truncate_metrics(ckpt["metrics_size"])
        return ckpt["trainer_state"]

    def _save_state(self, state: dict[str, Any]) -> None:
        if self.run is None or not self.cfg.trainer.checkpoint:
            return
        self.run.save_checkpoint(
            {
                "config": self.cfg.to_dict(),
                "trainer_state": state,
                "method_state": self.method.state_dict(),
                "metrics_size": self.run.metrics_size(),
                "rng": {"torch": torch.get_rng_state()},
            }
        )

    def _log(self, record: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(record)

    # ----------------------------------------------------------------- loop

    def fit(self, resume: bool = False) -> dict[str, Any]:
        cfg, tc, method = self.cfg, self.cfg.trainer, self.method
        if self.run is not None and not resume:
            self.run.write_config(cfg.to_dict())
            self.run.write_env(environment(self.device))
        state = self._load_state() if resume else self._fresh_state()
        tasks = self.stream.tasks
        bar = tqdm(total=len(tasks), initial=state["next_task"], desc="tasks", unit="task", disable=not tc.progress)
        for t in range(state["next_task"], len(tasks)):
            task = tasks[t]
            torch.manual_seed(task_seed(cfg.seed, t))
            gen = torch.Generator(device=self.device).manual_seed(task_seed(cfg.seed, t))
            self._sync()
            started = time.perf_counter()
            method.train()
            method.before_task(task)
            data = method.training_data(task)
            n = int(data.y.shape[0])
            steps_per_epoch = math.ceil(n / tc.batch_size)
            batches = tqdm(
                total=tc.epochs * steps_per_epoch, desc=f"task {t}", unit="step", leave=False, disable=not tc.progress
            )
            curve: list[tuple[int, float]] = []  # (steps on this task, accuracy on it), untimed
            if tc.curve_every:
                pause = time.perf_counter()
                curve.append((0, self._curve_point(task)))
                started += time.perf_counter() - pause
            for epoch in range(tc.epochs):
                order = torch.randperm(n, device=self.device, generator=gen)
                sums: dict[str, torch.Tensor] = {}
                for b in range(steps_per_epoch):
                    idx = order[b * tc.batch_size : (b + 1) * tc.batch_size]
                    batch = Batch(data.x[idx], data.y[idx], None if data.task_ids is None else data.task_ids[idx])
                    losses = method.train_step(batch, task)
                    for k, v in losses.items():
                        if k in sums:
                            sums[k].add_(v)
                        else:
                            sums[k] = v.clone()
                    state["steps"] += 1
                    task_steps = epoch * steps_per_epoch + b + 1
                    if tc.curve_every and task_steps % tc.curve_every == 0:
                        pause = time.perf_counter()
                        curve.append((task_steps, self._curve_point(task)))
                        started += time.perf_counter() - pause  # evaluation time is not training time
                    if tc.log_every and state["steps"] % tc.log_every == 0:
                        self._log({"type": "step", "task": t, "step": state["steps"], **{k: float(v) for k, v in losses.items()}})
                    batches.update()
                means = {k: float(v) / steps_per_epoch for k, v in sums.items()}  # one sync per epoch
                bad = {k: v for k, v in means.items() if not math.isfinite(v)}
                if bad:
                    batches.close()
                    bar.close()
                    kept = f"the checkpoint after task {t - 1} is kept" if t > 0 else "no task had finished"
                    raise TrainingDiverged(
                        f"{', '.join(f'{k} = {v}' for k, v in bad.items())} in task {t}, epoch {epoch}: training stopped "
                        f"({kept}). Lower trainer.lr or the method's strength and start a new run."
                    )
                self._log({"type": "epoch", "task": t, "epoch": epoch, "step": state["steps"], **means})
                state["samples_seen"] += n
            batches.close()
            method.after_task(task)
            self._sync()
            state["train_seconds"] += time.perf_counter() - started

            row = evaluate(method, tasks, tc.eval_batch_size)
            held = evaluate(method, self.stream.heldout, tc.eval_batch_size)
            state["curves"].append(curve)
            state["acc_rows"].append(row)
            state["heldout_rows"].append(held)
            state["next_task"] = t + 1
            self._log({"type": "eval", "task": t, "step": state["steps"], "acc": row, "heldout_acc": held})
            self._save_state(state)
            bar.set_postfix(acc=f"{np.mean(row[: t + 1]):.3f}")
            bar.update()
        bar.close()
        results = self.results(state)
        if self.run is not None:
            self.run.write_results(results)
        return results

    def _curve_point(self, task: Task) -> float:
        return evaluate(self.method, [task], self.cfg.trainer.eval_batch_size)[0]  # restores train mode

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def results(self, state: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        acc = state["acc_rows"]
        secs = state["train_seconds"]
        return {
            "method": cfg.method.name,
            "benchmark": cfg.benchmark.name,
            "scenario": self.stream.scenario,
            "seed": cfg.seed,
            "num_tasks": self.stream.num_tasks,
            "task_names": [t.name for t in self.stream.tasks],
            "acc_matrix": acc,
            "initial_acc": state["initial_acc"],
            **metrics.summary(acc, state["initial_acc"]),
            "zero_shot_acc": metrics.zero_shot(acc, state["initial_acc"]),
            "learning_curves": state["curves"],
            "steps_to_90": [metrics.steps_to_fraction(c, 0.9) for c in state["curves"]],
            "heldout_names": [t.name for t in self.stream.heldout],
            "heldout_acc_matrix": state["heldout_rows"],
            "initial_heldout_acc": state["initial_heldout"],
            "train_seconds": secs,
            "train_samples_per_second": state["samples_seen"] / secs if secs > 0 else None,
            "train_steps": state["steps"],
            "peak_memory_mb": peak_memory_mb(self.device),
            "device": str(self.device),
            **self.method.extra_results(),
            **self._mask_figures(),
        }

    def _mask_figures(self) -> dict[str, Any]:
        """Density and overlap of the tasks' masks, for gating methods (those with ``unit_mask``)."""
        masks = [self.method.unit_mask(t) for t in self.stream.tasks]
        if any(m is None for m in masks):
            return {}
        oracle = [t.oracle_mask for t in self.stream.tasks]
        return metrics.mask_summary(
            [m.cpu() for m in masks],  # type: ignore[union-attr]
            self.stream.contexts().cpu(),
            None if any(o is None for o in oracle) else [torch.cat(o).cpu() for o in oracle],  # type: ignore[arg-type]
        )
