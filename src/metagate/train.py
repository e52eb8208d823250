"""The Trainer: tasks in order, batches by index over in-memory tensors, every task evaluated after
every task, a checkpoint after each task, resume from the last one.

Reads top to bottom: ``fit`` is the whole loop. It never knows which method it drives.
"""

from __future__ import annotations

import math
import random
import sys
import time
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from metagate import metrics
from metagate.compile import compile_step
from metagate.data import build_stream
from metagate.data.provenance import same_data
from metagate.data.stream import Stream, Task
from metagate.methods import Batch, Method, create_method
from metagate.runs import CheckpointError, RunDir, environment
from metagate.runtime import PeakMemory, check_machine, configure_threads, resolve_device
from metagate.schema import ExperimentConfig
from metagate.seeds import few_shot_seed, task_seed
from metagate.tracking import Tracker, check_tracking, open_tracker, summary_figures, task_figures

__all__ = ["Trainer", "TrainingDiverged", "evaluate", "resolve_device", "task_seed"]

# metrics.jsonl record fields that say where a record belongs; the others are its values.
RECORD_FIELDS = ("type", "task", "epoch", "step")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite, or grew by orders of magnitude; the last good checkpoint is kept."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(method: Method, tasks: list[Task], batch_size: int, split: str = "test") -> list[float]:
    """Accuracy on each task's ``test`` (or ``val``) split, one host sync for all tasks; ``None`` for
    a task without data in that split."""
    if not tasks:
        return []
    was_training = method.training
    method.eval()
    correct = []
    for task in tasks:
        xs, ys = task.split(split)
        hits = torch.zeros((), dtype=torch.long, device=ys.device)
        for start in range(0, len(ys), batch_size):
            x = xs[start : start + batch_size]
            y = ys[start : start + batch_size]
            hits += (method.predict(x, task).argmax(dim=1) == y).sum()
        correct.append(hits)
    method.train(was_training)
    counts = torch.stack(correct).cpu().tolist()
    sizes = [len(t.split(split)[1]) for t in tasks]
    return [c / n if n else None for c, n in zip(counts, sizes)]


class Trainer:
    """Drives one method through one stream for one validated config, writing into ``run`` (if given).

    It never reads a config file nor decides what a run folder holds: :mod:`metagate.orchestrate` creates or
    opens the folder, holds its lock, and checks that a resumed run is the same run (:mod:`metagate.identity`)."""

    def __init__(self, cfg: ExperimentConfig, run: RunDir | None = None) -> None:
        self.cfg = cfg
        self.run = run
        check_tracking(cfg.tracking)
        self.device = check_machine(cfg)
        self.threads = configure_threads(cfg.trainer.resolved_threads())
        seed_everything(cfg.seed)
        self.stream: Stream = build_stream(cfg.benchmark, cfg.seed).to(self.device)
        torch.manual_seed(task_seed(cfg.seed, -1))
        self.method: Method = create_method(cfg.method, self.stream, cfg.trainer, self.device)
        self.tracker: Tracker = Tracker()  # opened by fit (TensorBoard, MLflow), when the config switches them on

    # ----------------------------------------------------------------- state

    def _fresh_state(self) -> dict[str, Any]:
        return {
            "next_task": 0,
            "acc_rows": [],
            "heldout_rows": [],
            "initial_acc": evaluate(self.method, self.stream.tasks, self.cfg.trainer.eval_batch_size),
            "initial_heldout": evaluate(self.method, self.stream.heldout, self.cfg.trainer.eval_batch_size),
            "val_rows": [],
            "initial_val": evaluate(self.method, self.stream.tasks, self.cfg.trainer.eval_batch_size, "val"),
            "train_seconds": 0.0,
            "task_seconds": [],
            "samples_seen": 0,
            "steps": 0,
            "curves": [],
        }

    def _load_state(self) -> dict[str, Any]:
        assert self.run is not None
        ckpt = self.run.load_checkpoint(self.device)  # that it is this config's run, orchestration checked
        data = ckpt.get("provenance", {})
        if data.get("sha256") and not same_data(data["sha256"], str(self.stream.provenance.get("sha256"))):
            raise CheckpointError(
                f"the data differ from those the run in {self.run.path} started with "
                f"({data.get('location')}, sha256 {data.get('sha256')}; now {self.stream.provenance.get('location')}, "
                f"sha256 {self.stream.provenance.get('sha256')}); point benchmark.root at the original files, or start a new run"
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
                "provenance": self.stream.provenance,
            }
        )

    def _log(self, record: dict[str, Any]) -> None:
        """A metrics.jsonl record; its losses (numbers already on the host) also go to the tracker."""
        if self.run is not None:
            self.run.log(record)
        if record["type"] in ("step", "epoch"):
            prefix = "train" if record["type"] == "step" else "epoch"
            self.tracker.log_step(record["step"], {f"{prefix}/{k}": v for k, v in record.items() if k not in RECORD_FIELDS})

    # ----------------------------------------------------------------- loop

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train the stream (from the run folder's last checkpoint with ``resume``). The caller owns the
        folder: it made or opened it, holds its lock, and checked that a resumed run is this config's."""
        self.memory = PeakMemory(self.device).start()
        try:
            return self._fit(resume)
        except BaseException as e:
            self.tracker.close("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            self.tracker.close()  # a no-op once closed; before the caller unlocks the folder (TensorBoard writes into it)
            self.tracker = Tracker()
            self.memory.stop()

    def _fit(self, resume: bool) -> dict[str, Any]:
        cfg, tc, method = self.cfg, self.cfg.trainer, self.method
        if self.run is not None and not resume:
            self.run.write_config(cfg.to_dict(), self.stream.provenance)
            self.run.write_env(environment(self.device))
        state = self._load_state() if resume else self._fresh_state()
        self.tracker = open_tracker(cfg, None if self.run is None else self.run.path, resume, state["steps"])
        self.tracker.log_params(cfg.to_dict())
        tasks = self.stream.tasks
        train_step = compile_step(method.train_step, len(tasks)) if tc.compile else method.train_step
        bars = tc.progress and sys.stderr.isatty()  # bars on a terminal; in a log, one line per epoch
        lines = tc.progress and not bars
        bar = tqdm(total=len(tasks), initial=state["next_task"], desc="tasks", unit="task", disable=not bars)
        first_loss: torch.Tensor | None = None  # the run's first task loss, the scale for divergence
        for t in range(state["next_task"], len(tasks)):
            task = tasks[t]
            torch.manual_seed(task_seed(cfg.seed, t))
            gen = torch.Generator(device=self.device).manual_seed(task_seed(cfg.seed, t))
            self._few_shot(task, state)
            self._sync()
            started = time.perf_counter()
            method.train()
            method.before_task(task)
            data = method.training_data(task)
            n = int(data.y.shape[0])
            steps_per_epoch = math.ceil(n / tc.batch_size)
            # trainer.iterations_per_task: that many steps, over full passes and a last one cut short
            total_steps = tc.iterations_per_task or method.epochs_for(task, tc.epochs) * steps_per_epoch
            num_epochs = math.ceil(total_steps / steps_per_epoch)
            batches = tqdm(total=total_steps, desc=f"task {t}", unit="step", leave=False, disable=not bars)
            curve: list[tuple[int, float]] = []  # (steps on this task, accuracy on it), untimed
            if tc.curve_every:
                pause = time.perf_counter()
                curve.append((0, self._curve_point(task)))
                started += time.perf_counter() - pause
            for epoch in range(num_epochs):
                order = torch.randperm(n, device=self.device, generator=gen)
                sums: dict[str, torch.Tensor] = {}
                epoch_steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
                for b in range(epoch_steps):
                    idx = order[b * tc.batch_size : (b + 1) * tc.batch_size]
                    batch = Batch(data.x[idx], data.y[idx], None if data.task_ids is None else data.task_ids[idx])
                    losses = train_step(batch, task)
                    if first_loss is None and "reference_loss" not in state:
                        first_loss = losses["loss"].detach().clone()
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
                means = {k: float(v) / epoch_steps for k, v in sums.items()}  # one sync per epoch
                if first_loss is not None:
                    state["reference_loss"] = float(first_loss)
                    first_loss = None
                problem = self._divergence(means, state.get("reference_loss"))
                if problem:
                    batches.close()
                    bar.close()
                    raise TrainingDiverged(
                        f"{problem} in task {t}, epoch {epoch}: training stopped ({self._kept(t)}). "
                        "Lower trainer.lr or the method's strength and start a new run."
                    )
                self._log({"type": "epoch", "task": t, "epoch": epoch, "step": state["steps"], **means})
                state["samples_seen"] += min(n, epoch_steps * tc.batch_size)
                if lines:
                    losses_text = "  ".join(f"{k} {v:.4g}" for k, v in means.items())
                    print(f"task {t + 1}/{len(tasks)}  epoch {epoch + 1}/{num_epochs}  {losses_text}", file=sys.stderr, flush=True)
            batches.close()
            method.after_task(task)
            self._sync()
            took = time.perf_counter() - started
            state["train_seconds"] += took
            if "task_seconds" in state:  # absent in checkpoints written before it was recorded
                state["task_seconds"].append(took)

            row = evaluate(method, tasks, tc.eval_batch_size)
            held = evaluate(method, self.stream.heldout, tc.eval_batch_size)
            val = evaluate(method, tasks, tc.eval_batch_size, "val")
            state["curves"].append(curve)
            state["acc_rows"].append(row)
            state["val_rows"].append(val)
            state["heldout_rows"].append(held)
            state["next_task"] = t + 1
            self._log({"type": "eval", "task": t, "step": state["steps"], "acc": row, "heldout_acc": held, "val_acc": val})
            self.tracker.log_task(t, task_figures(t, row, val, held, (state.get("task_seconds") or [None])[-1]))
            for name, image in method.report(task).images.items():  # sample grids of generative replay methods
                if self.run is not None:
                    self.run.write_image(name, image)
                state.setdefault("artifacts", []).append(name)
            self._save_state(state)
            bar.set_postfix(acc=f"{np.mean(row[: t + 1]):.3f}")
            bar.update()
            if lines:
                print(f"task {t + 1}/{len(tasks)} done: mean accuracy on tasks so far {np.mean(row[: t + 1]):.3f}", file=sys.stderr, flush=True)
        bar.close()
        results = self.results(state)
        if self.run is not None:
            self.run.write_results(results)
        self.tracker.log_summary(summary_figures(results))
        return results

    def _divergence(self, means: dict[str, float], reference: float | None) -> str | None:
        """What says training diverged: a loss that is NaN or infinite, or a task loss grown past
        ``trainer.divergence_factor`` times the run's first one (at least that many times 1)."""
        bad = {k: v for k, v in means.items() if not math.isfinite(v)}
        if bad:
            return ", ".join(f"{k} = {v}" for k, v in bad.items())
        loss = means.get("loss")
        if loss is not None and reference is not None:
            limit = self.cfg.trainer.divergence_factor * max(abs(reference), 1.0)
            if loss > limit:
                return f"loss = {loss:.3g}, over {self.cfg.trainer.divergence_factor:g} x the first loss ({reference:.3g})"
        return None

    def _kept(self, t: int) -> str:
        """What a stopped run leaves to resume from, as a phrase."""
        if self.run is None or not self.cfg.trainer.checkpoint:
            return "no checkpoints are written with trainer.checkpoint=false, so it cannot be resumed"
        return f"the checkpoint after task {t - 1} is kept" if t > 0 else "no task had finished, so there is no checkpoint"

    def _few_shot(self, task: Task, state: dict[str, Any]) -> None:
        """The method's few-shot measurement of ``task`` (:meth:`Method.few_shot`), before it trains and untimed: its
        test and val accuracy with what the method inferred from a few labelled examples, appended to the state's
        ``few_shot_acc`` / ``few_shot_val_acc`` (absent for methods without one). The examples' generator is seeded
        from the run's seed and the task, so a resumed run draws the same."""
        seed = few_shot_seed(self.cfg.seed, task.index)
        probe = self.method.few_shot(task, torch.Generator(device=self.device).manual_seed(seed))
        if probe is None:
            return
        size = self.cfg.trainer.eval_batch_size
        with probe:
            test, val = evaluate(self.method, [task], size)[0], evaluate(self.method, [task], size, "val")[0]
        state.setdefault("few_shot_acc", []).append(test)
        state.setdefault("few_shot_val_acc", []).append(val)

    def _curve_point(self, task: Task) -> float:
        return evaluate(self.method, [task], self.cfg.trainer.eval_batch_size)[0]  # restores train mode

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def results(self, state: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        acc = state["acc_rows"]
        secs = state["train_seconds"]
        peak_memory = self.memory.stop()  # the run's own peak, before the method's report is made
        report = self.method.report()
        return {
            "method": cfg.method.name,
            "benchmark": cfg.benchmark.name,
            "scenario": self.stream.scenario,
            "test_time_info": report.test_time_info,
            "seed": cfg.seed,
            "num_tasks": self.stream.num_tasks,
            "task_names": [t.name for t in self.stream.tasks],
            "acc_matrix": acc,
            "initial_acc": state["initial_acc"],
            **metrics.summary(acc, state["initial_acc"]),
            **self._validation(state),
            "zero_shot_acc": metrics.zero_shot(acc, state["initial_acc"]),
            "learning_curves": state["curves"],
            "steps_to_90": [metrics.steps_to_fraction(c, 0.9) for c in state["curves"]],
            "heldout_names": [t.name for t in self.stream.heldout],
            "heldout_acc_matrix": state["heldout_rows"],
            "initial_heldout_acc": state["initial_heldout"],
            "train_seconds": secs,
            "task_seconds": state.get("task_seconds"),  # training time of each task (None: a run resumed from an older checkpoint)
            "train_samples_per_second": state["samples_seen"] / secs if secs > 0 else None,
            "train_steps": state["steps"],
            "peak_memory_mb": peak_memory,
            "device": str(self.device),
            "threads": self.threads,
            "data": self.stream.provenance,
            **self._storage(report.task_bytes),
            **({"artifacts": state["artifacts"]} if state.get("artifacts") else {}),
            # few-shot accuracy of each task before training it (methods with a few-shot measurement only)
            **{k: state[k] for k in ("few_shot_acc", "few_shot_val_acc") if k in state},
            **report.figures,
            **self._mask_figures(report.unit_masks),
        }

    def _validation(self, state: dict[str, Any]) -> dict[str, Any]:
        """The validation matrix (like ``acc_matrix``, on each task's validation split) and its summary
        as ``val_acc``, ``val_bwt``, ... (choose hyperparameters on these, report the test figures)."""
        rows = state.get("val_rows") or []
        if not rows or any(v is None for v in rows[-1]):
            return {"val_acc_matrix": rows or None}
        return {
            "val_acc_matrix": rows,
            "initial_val_acc": state["initial_val"],
            **{f"val_{k}": v for k, v in metrics.summary(rows, state["initial_val"]).items()},
        }

    @staticmethod
    def _storage(sizes: list[int | None] | None) -> dict[str, Any]:
        """``task_bytes``: what each task added to what the method keeps (its mask bits, head, embedding, ...);
        ``bytes_per_task``: their mean over the tasks after the first (the first may carry a backbone)."""
        if sizes is None or any(s is None for s in sizes):
            return {"task_bytes": None, "bytes_per_task": None}
        later = sizes[1:] or sizes
        return {"task_bytes": sizes, "bytes_per_task": sum(later) / len(later)}  # type: ignore[arg-type]

    def _mask_figures(self, masks: list[torch.Tensor | None] | None) -> dict[str, Any]:
        """Density and overlap of the tasks' masks, for gating methods (those that report ``unit_masks``)."""
        if masks is None or any(m is None for m in masks):
            return {}
        oracle = [t.oracle_mask for t in self.stream.tasks]
        return metrics.mask_summary(
            [m.cpu() for m in masks],  # type: ignore[union-attr]
            self.stream.contexts().cpu(),
            None if any(o is None for o in oracle) else [torch.cat(o).cpu() for o in oracle],  # type: ignore[arg-type]
        )
