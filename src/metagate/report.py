"""Tables of one run for the terminal and Markdown: per-task accuracy and a summary line (tables over seeds:
:mod:`metagate.aggregate`)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from metagate import metrics


def pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}"


MARKDOWN_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "|": "&#124;", "\n": " "})


def md_escape(text: str) -> str:
    """``text`` (a folder name, a label) as plain text in Markdown: ``<img onerror=...>`` is not rendered
    as HTML by a Markdown viewer, and ``a|b`` does not split a table cell (HTML entities for both)."""
    return str(text).translate(MARKDOWN_ESCAPES)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table; every cell is escaped (:func:`md_escape`), so cells hold plain text."""
    lines = ["| " + " | ".join(map(md_escape, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(md_escape, r)) + " |" for r in rows]
    return "\n".join(lines)


def _task_columns(results: dict[str, Any]) -> dict[str, list[str]]:
    """Per task: accuracy before training it (zero-shot), right after, at the end, steps to 90%."""
    r = np.asarray(results["acc_matrix"])
    zero_shot = metrics.zero_shot(results["acc_matrix"], results["initial_acc"])
    steps = results.get("steps_to_90") or [None] * len(r)
    cols = {
        "zero-shot (%)": [pct(z) for z in zero_shot],
        "just trained (%)": [pct(r[j, j]) for j in range(len(r))],
        "final (%)": [pct(r[-1, j]) for j in range(len(r))],
    }
    if any(s is not None for s in steps):
        cols["steps to 90%"] = ["n/a" if s is None else str(s) for s in steps]
    return cols


def per_task_table(results: dict[str, Any], reference: dict[str, Any] | list[dict[str, Any]] | None = None) -> str:
    """One row per task: zero-shot accuracy (before training it), just after training it, at the end,
    and steps to 90% of its final accuracy (with learning curves); with ``reference`` runs on the same
    stream (one or a list), each figure of every run, the method's first."""
    refs = [] if reference is None else reference if isinstance(reference, list) else [reference]
    names = results["task_names"]
    cols = _task_columns(results)
    if not refs:
        r = np.asarray(results["acc_matrix"])
        cols["change (pt)"] = [pct(r[-1, j] - r[j, j]) for j in range(len(names))]
        header, columns = list(cols), list(cols.values())
    else:
        others = [_task_columns(ref) for ref in refs]
        header, columns = [], []
        for key in cols:
            runs = [(results["method"], cols)] + [(ref["method"], o) for ref, o in zip(refs, others) if key in o]
            header += [f"{key} {name}" for name, _ in runs]
            columns += [c[key] for _, c in runs]
    rows = [[str(j), name, *(c[j] for c in columns)] for j, name in enumerate(names)]
    table = markdown_table(["task", "name", *header], rows)
    table += generated_section(results)
    for ref in refs:
        if results.get("test_time_info") != ref.get("test_time_info"):
            table += (
                f"\n\nNot like for like: {results['method']} uses {uses_at_test(results.get('test_time_info'))} at test, "
                f"{ref['method']} uses {uses_at_test(ref.get('test_time_info'))}."
            )
    return table


def with_unit(x: float | None, unit: str) -> str:
    """``12.3 pt``, or ``n/a`` without a unit when there is no value."""
    return "n/a" if x is None else f"{pct(x)}{unit}"


def summary_line(results: dict[str, Any]) -> str:
    speed = results.get("train_samples_per_second")
    info = results.get("test_time_info")
    return (
        (f"[{results.get('scenario')}-incremental, uses {uses_at_test(info)} at test]  " if info else "")
        + f"ACC {with_unit(results['acc'], '%')}  BWT {with_unit(results['bwt'], ' pt')}  FWT {with_unit(results['fwt'], ' pt')}  "
        f"forgetting {with_unit(results['forgetting'], ' pt')}  ({results['train_seconds']:.1f} s training"
        + (f", {speed:,.0f} samples/s)" if speed else ")")
    )


TEST_TIME_LABELS = {"none": "nothing", "task_id": "task identity", "context": "context"}


def uses_at_test(info: str | None) -> str:
    """``task_id`` -> ``task identity``: what a method used at test time, for tables."""
    return "n/a" if info is None else "/".join(TEST_TIME_LABELS.get(i, i) for i in info.split("/"))


def generated_section(results: dict[str, Any]) -> str:
    """Generative replay: the generated-sample accuracy per class after each task (``generated_class_acc``,
    MeRGAN's evaluation) and the sample grids saved in the run folder (``artifacts``), as Markdown."""
    out = ""
    rows = results.get("generated_class_acc")
    if rows:
        classes = [c for c in range(len(rows[0])) if any(r[c] is not None for r in rows)]
        means = results.get("generated_acc") or [None] * len(rows)
        body = [[str(t), *(pct(r[c]) for c in classes), pct(means[t])] for t, r in enumerate(rows)]
        out += "\n\nGenerated-sample accuracy (%) per class (output unit), scored by a classifier trained on all classes' real data:\n\n"
        out += markdown_table(["after task", *(str(c) for c in classes), "mean"], body)
    images = [a for a in results.get("artifacts") or [] if a.endswith(".png")]
    if images:
        out += "\n\nSamples after each task (one row per class learned so far, or 10 x 10 unconditional samples):\n\n"
        out += "\n".join(f"![{name}]({name})" for name in images)
    return out
