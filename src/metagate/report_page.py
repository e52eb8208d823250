"""A report page of a run folder, or of a folder of runs: ``report.html`` and ``report.md``.

``report.html`` stands alone: its figures are base64 PNG data URIs, its style is inline, it loads
nothing from anywhere (one inline script only counts the images that decoded, into
``body[data-images-ok]``, for checks in a browser). ``report.md`` shows the same figures as PNG files
under ``report/`` beside it. Both are written atomically into the folder; nothing else in it is
touched.

* A run folder (it holds ``results.json``): the scenario and what the method used at test, the
  summary line, the accuracy matrix, each task's accuracy over the stream, the learning curves, the
  masks of a gating method, the per-task table (with the sample grids of generative replay), and the
  reference runs (``reference/``, ``reference-2/``, ...) beside the method.
* A folder of runs (``compare``, ``sweep``, any folder with run folders below it): per method label,
  ACC, BWT and training time over seeds as bars (± std, 95% CI), the aggregated table, and one
  representative run per label (its lowest seed). A tuned sweep (``tuning.json``; ``tune``,
  ``sweep --tune``) shows its ``final/`` runs so, and each candidate's validation accuracy.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, Union

from metagate import aggregate, plots, report
from metagate.aggregate import RunRecord
from metagate.runs import RunDir, atomic_write_bytes, atomic_write_text, check_results

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT_HTML = "report.html"
REPORT_MD = "report.md"
FIGURE_DIR = "report"  # report.md's PNG files
REFERENCE_DIR = re.compile(r"reference(-\d+)?")
IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
TUNING, TUNING_DIR, FINAL = "tuning.json", "tuning", "final"  # a tuned sweep's choice, its tuning runs, the chosen on fresh seeds
WHAT_TO_PASS = "pass a run folder (it holds results.json) or a folder with run folders below it (compare, sweep, tune)"


class ReportProblem(ValueError):
    """A folder a report cannot be made of; the message is one line that says what to do."""


# --------------------------------------------------------------------------- blocks of a page


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Markdown:
    """Markdown from :mod:`metagate.report` (paragraphs, tables, ``- `` lists, image links relative to ``base``)."""

    text: str
    base: Path


@dataclass
class Plot:
    name: str  # file name (without .png) under report/
    png: bytes
    caption: str


Block = Union[Heading, Markdown, Plot]


def _plot(name: str, fig: Figure, caption: str) -> Plot:
    return Plot(name, plots.to_png(fig), caption)


# --------------------------------------------------------------------------- reading


def read_results(path: Path) -> dict[str, Any]:
    """A run's ``results.json``; a damaged one is a :class:`ReportProblem` that says what to do."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        run = path.parent.parent if REFERENCE_DIR.fullmatch(path.parent.name) else path.parent  # a reference is resumed with its run
        raise ReportProblem(
            f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]}): the file is damaged or cut short; "
            f"delete it and write it again with metagate run --resume --out {run}, or move that run folder away"
        ) from None
    return check_results(data, path)  # a ragged matrix or a missing figure: one line naming the file


def reference_runs(folder: Path) -> list[tuple[str, dict[str, Any]]]:
    """The finished reference runs inside a run folder, in order: (folder name, results)."""
    def order(p: Path) -> int:
        return int(p.name.split("-")[1]) if "-" in p.name else 1

    found = [p for p in folder.iterdir() if p.is_dir() and REFERENCE_DIR.fullmatch(p.name) and (p / RunDir.RESULTS).is_file()]
    return [(p.name, read_results(p / RunDir.RESULTS)) for p in sorted(found, key=order)]


def _check_folder(folder: Path) -> None:
    """A folder with a run at or below it, where the report can be written; else a one-line problem."""
    if not folder.exists():
        raise ReportProblem(f"{folder} does not exist; {WHAT_TO_PASS}")
    if not folder.is_dir():
        raise ReportProblem(f"{folder} is a file, not a folder; {WHAT_TO_PASS}")
    if next(folder.rglob(RunDir.RESULTS), None) is None:
        raise ReportProblem(f"no results.json in {folder} or below it, so there is nothing to report; {WHAT_TO_PASS}")
    if not os.access(folder, os.W_OK | os.X_OK) or (folder / FIGURE_DIR).is_file():
        raise ReportProblem(
            f"cannot write the report into {folder} (not writable, or {FIGURE_DIR} is a file): the report is written "
            "into the folder it reports on; make it writable, or report on a copy of it"
        )


# --------------------------------------------------------------------------- one run


def _zero_shot(results: dict[str, Any]) -> list[float]:
    r, first = results["acc_matrix"], results["initial_acc"][0]
    return results.get("zero_shot_acc") or [first] + [r[t - 1][t] for t in range(1, len(r))]


def _about(results: dict[str, Any]) -> str:
    """The run in one paragraph: stream, scenario, what the method used at test, and the summary line."""
    info = results.get("test_time_info")
    return (
        f"{results['method']} on {results['benchmark']}, seed {results.get('seed')}: {results['num_tasks']} tasks, "
        f"{results.get('scenario') or 'n/a'}-incremental; at test the method uses {report.uses_at_test(info)} "
        f"(test_time_info: {info}). Trained on {results.get('device', 'n/a')} with {results.get('threads', 'n/a')} thread(s).\n\n"
        f"{report.summary_line(results)}"
    )


def _mask_text(results: dict[str, Any]) -> str:
    parts = [
        f"{label} {results[key]:.2f}"
        for key, label in (
            ("mask_overlap_mean", "mean overlap (IoU) between tasks"),
            ("context_mask_correlation", "correlation of context distance with mask distance"),
            ("oracle_overlap_correlation", "correlation of the overlaps with the oracle's"),
        )
        if results.get(key) is not None
    ]
    return "; ".join(parts) + "." if parts else ""


def run_blocks(folder: Path, results: dict[str, Any], references: Sequence[tuple[str, dict[str, Any]]]) -> list[Block]:
    """The page of one run with its reference runs."""
    acc, names = results["acc_matrix"], results.get("task_names")
    blocks: list[Block] = [
        Heading(f"{results['method']} on {results['benchmark']}, seed {results.get('seed')}", 1),
        Markdown(_about(results), folder),
    ]
    if references:
        lines = [f"- {r['method']} ({name}/): {report.summary_line(r)}" for name, r in references]
        blocks += [Heading("Reference runs"), Markdown("Trained on the same stream and seed.\n\n" + "\n".join(lines), folder)]
    blocks += [
        Heading("Accuracy"),
        _plot("acc_matrix", plots.acc_matrix_figure(acc), "Accuracy on task j (column) after training task i (row)."),
        _plot("over_stream", plots.over_stream_figure(acc, names), "Accuracy on each task after each task of the stream is trained."),
    ]
    if references:
        runs = [(results["method"], results), *((r["method"], r) for _, r in references)]
        zero = {name: _zero_shot(r) for name, r in runs}
        trained = {name: [r["acc_matrix"][t][t] for t in range(len(r["acc_matrix"]))] for name, r in runs}
        blocks += [
            Heading("Next to the reference runs"),
            _plot("references", plots.per_task_runs_figure(zero, trained), "Per task: accuracy before training it and just after."),
        ]
    curves = results.get("learning_curves")
    if curves and any(len(c) > 1 for c in curves):
        figure = plots.learning_curves_figure(curves, names)
        blocks += [Heading("Learning curves"), _plot("learning_curves", figure, "Accuracy on each task while it trains.")]
    if results.get("mask_density"):
        blocks += [
            Heading("Masks"),
            _plot("masks", plots.masks_figure(results["mask_density"], results.get("mask_overlap")), "The gating masks of the tasks."),
        ]
        if text := _mask_text(results):
            blocks.append(Markdown(text, folder))
    blocks += [Heading("Per task"), Markdown(report.per_task_table(results, [r for _, r in references] or None), folder)]
    return blocks


# --------------------------------------------------------------------------- many runs


def _seed(record: RunRecord) -> int:
    seed = record.results.get("seed")
    return seed if isinstance(seed, int) else 1 << 62


def sweep_blocks(root: Path, records: list[RunRecord], where: str = "") -> list[Block]:
    """The page of many runs (``where``: the part of ``root`` they come from): bars and a table over
    seeds per label, one representative run per label."""
    groups = aggregate.group(records)
    summary = aggregate.summarise(groups, records)
    blocks: list[Block] = [
        Heading(f"{len(records)} runs in {root.name or root}{where}", 1),
        Markdown(f"{len(groups)} labels: {report.md_escape(', '.join(groups))}. Mean ± std over seeds.", root),
        _plot("summary", plots.summary_bars_figure(summary), "Per label: mean over seeds, ± std (black) and the 95% CI (red)."),
        Markdown(aggregate.table(summary), root),
    ]
    for label, runs in groups.items():
        first = min(runs, key=_seed)
        where = os.path.relpath(first.folder, root)
        res = first.results
        about = f"Representative run: {report.md_escape(where)}/ (seed {res.get('seed')}, {len(runs)} run(s) in all).\n\n{report.summary_line(res)}"
        figure = plots.run_overview_figure(res["acc_matrix"], res.get("mask_overlap"))
        blocks += [Heading(label), Markdown(about, root), _plot(f"run-{_slug(label)}", figure, f"{label}: {where}")]
        images = [a for a in res.get("artifacts") or [] if a.endswith(".png")]
        if images:
            blocks.append(Markdown(f"Samples after the last task:\n\n![{images[-1]}]({where}/{images[-1]})", root))
    return blocks


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-") or "run"


# --------------------------------------------------------------------------- rendering


def _image_uri(path: Path) -> str | None:
    """A PNG file as a data URI; ``None`` for anything else or a file that is not there."""
    if path.suffix.lower() != ".png" or not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _figure_html(uri: str, alt: str, caption: str) -> str:
    return f'<figure><img src="{uri}" alt="{html.escape(alt)}"><figcaption>{html.escape(caption)}</figcaption></figure>'


def _inline(text: str) -> str:
    """Escaped text with `code` spans (the Markdown's own entities, :func:`~metagate.report.md_escape`, read first)."""
    parts = [html.escape(html.unescape(p)) for p in text.split("`")]
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _table_html(lines: list[str]) -> str:
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines if not re.fullmatch(r"\|[-|: ]+\|", line.strip())]
    head = "".join(f"<th>{_inline(c)}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in cells[1:])
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def markdown_html(text: str, base: Path) -> str:
    """The Markdown that :mod:`metagate.report` writes (tables, paragraphs, lists, image links) as HTML;
    images are read from ``base`` and embedded (a missing one is named, never linked)."""
    out = []
    for chunk in re.split(r"\n\s*\n", text.strip()):
        lines = chunk.splitlines()
        if all(line.lstrip().startswith("|") for line in lines):
            out.append(_table_html(lines))
        elif all(IMAGE_LINK.fullmatch(line.strip()) for line in lines):
            for line in lines:
                alt, src = IMAGE_LINK.fullmatch(line.strip()).groups()  # type: ignore[union-attr]
                uri = _image_uri(base / src)
                out.append(_figure_html(uri, alt, alt) if uri else f"<p>(image {html.escape(src)} not found)</p>")
        elif all(line.startswith("- ") for line in lines):
            out.append("<ul>" + "".join(f"<li>{_inline(line[2:])}</li>" for line in lines) + "</ul>")
        else:
            out.append("<p>" + "<br>".join(_inline(line) for line in lines) + "</p>")
    return "\n".join(out)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1150px; padding: 1em 2em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 12px; } .scroll { overflow-x: auto; }
td, th { border: 1px solid #ccc; padding: 2px 6px; text-align: right; } th { background: #f2f2f2; }
td:first-child, th:first-child { text-align: left; }
figure { display: inline-block; vertical-align: top; margin: .4em 1em .4em 0; } img { max-width: 100%; }
figcaption { font-size: 12px; color: #555; } code { background: #f4f4f4; padding: 0 .2em; }
"""
COUNT_IMAGES = """window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var ok = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.dataset.imagesOk = ok + "/" + images.length;
});"""


def render_html(blocks: Sequence[Block], title: str) -> str:
    body = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Markdown):
            body.append(markdown_html(b.text, b.base))
        else:
            body.append(_figure_html("data:image/png;base64," + base64.b64encode(b.png).decode(), b.name, b.caption))
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style><script>{COUNT_IMAGES}</script></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def render_markdown(blocks: Sequence[Block], root: Path) -> tuple[str, dict[str, bytes]]:
    """The page as Markdown, and the PNG files it links (paths relative to ``root``)."""
    out, files = [], {}
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {report.md_escape(b.text)}")
        elif isinstance(b, Markdown):
            rel = os.path.relpath(b.base, root)
            out.append(b.text if rel == "." else IMAGE_LINK.sub(lambda m: f"![{m[1]}]({rel}/{m[2]})", b.text))
        else:
            path = f"{FIGURE_DIR}/{b.name}.png"
            files[path] = b.png
            out.append(f"![{report.md_escape(b.caption).replace('[', '(').replace(']', ')')}]({path})")
    return "\n\n".join(out) + "\n", files


# --------------------------------------------------------------------------- the page


def page_blocks(folder: Path) -> list[Block]:
    """The blocks of ``folder``'s page: a run's page if it holds ``results.json``, else a page of the runs below it."""
    _check_folder(folder)
    if (folder / RunDir.RESULTS).is_file():
        return run_blocks(folder, read_results(folder / RunDir.RESULTS), reference_runs(folder))
    tuning = folder / TUNING
    final = folder / FINAL
    runs = final if tuning.is_file() and next(final.rglob(RunDir.RESULTS), None) is not None else folder
    try:
        records = aggregate.find_runs([runs])
    except aggregate.AggregationError as e:
        raise ReportProblem(str(e)) from None
    blocks = sweep_blocks(folder, records, f"/{FINAL}: the settings chosen on validation, on fresh seeds" if runs == final else "")
    return blocks + tuning_blocks(tuning, folder) if tuning.is_file() else blocks


def tuning_blocks(path: Path, root: Path) -> list[Block]:
    """The choice of a tuned sweep (``tuning.json``): every candidate's validation accuracy, the chosen ones marked."""
    try:
        record = json.loads(path.read_text())
        chosen = {m: " ".join(o) for m, o in record["chosen"].items()}
        rows = [
            [method, variant, " ".join(overrides) or "(as configured)", aggregate.fmt(record["validation"][variant]),
             "chosen" if " ".join(overrides) == chosen.get(method) else ""]
            for method, variants in record["candidates"].items()
            for variant, overrides in variants.items()
        ]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ReportProblem(f"{path} cannot be read ({type(e).__name__}); rerun the tuning with --resume to write it again") from None
    seeds = ", ".join(str(s) for s in record.get("tuning_seeds") or [])
    text = f"Each candidate on the tuning seeds ({seeds}, in {TUNING_DIR}/), chosen by mean validation accuracy "
    text += "(test accuracy is never read for the choice).\n\n"
    text += report.markdown_table(["method", "variant", "settings", "validation ACC (%)", ""], rows)
    return [Heading("Choice on validation"), Markdown(text, root)]


def write_report(folder: Path) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` (with its PNG files under ``report/``) into ``folder``;
    returns their paths. A folder with nothing to report raises :class:`ReportProblem`, a failed write
    (a full disk) :class:`~metagate.runs.RunFolderError`; the report's own files are the only ones written."""
    folder = Path(folder)
    blocks = page_blocks(folder)
    title = next(b.text for b in blocks if isinstance(b, Heading))
    markdown, files = render_markdown(blocks, folder)
    for name, png in files.items():
        atomic_write_bytes(folder / name, png)
    atomic_write_text(folder / REPORT_MD, markdown)
    atomic_write_text(folder / REPORT_HTML, render_html(blocks, title))
    return folder / REPORT_HTML, folder / REPORT_MD
