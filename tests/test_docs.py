"""The README and the docs say what is true: the two commands are the ones CI runs, every `metagate <command>`
they show exists, the files and pages they link exist, the README's method example trains, and
docs/results.md is exactly what the committed run summaries give."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metagate.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
# pages other branches of this change write (issue 28); the README links them already
PENDING: set[str] = set()  # pages linked before they exist (none now)


def code_of(text: str) -> list[str]:
    """The fenced blocks and inline code spans of a Markdown text."""
    fenced = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    rest = re.sub(r"```.*?```", "", text, flags=re.S)
    return fenced + re.findall(r"`([^`\n]+)`", rest)


def update_docs():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("update_docs", ROOT / "scripts" / "update_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_shows_the_two_commands_ci_runs() -> None:
    readme, ci = README.read_text(), (ROOT / ".ci" / "run").read_text()
    for command in ("bash scripts/setup.sh && .venv/bin/metagate run", "bash scripts/setup.sh && .venv/bin/python -m pytest"):
        assert command in readme
    assert "bash scripts/setup.sh && .venv/bin/python -m pytest" in ci
    assert len(readme.splitlines()) <= 300, "the README is a user's guide: the long references go to docs/"


def test_every_metagate_command_shown_exists() -> None:
    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    shown = set()
    for page in [README, *DOCS]:
        for code in code_of(page.read_text()):
            shown |= set(re.findall(r"(?:^|&& |bin/)metagate ([a-z_]+)", code.strip(), flags=re.M))
    assert {"run", "compare", "tune", "sweep", "aggregate", "report", "list"} <= shown
    assert shown <= commands, f"the docs show commands that do not exist: {sorted(shown - commands)}"


def test_linked_pages_and_named_files_exist() -> None:
    missing = []
    for page in [README, *DOCS]:
        text = page.read_text()
        for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in link:
                continue
            target = (page.parent / link).resolve()
            if not target.exists() and str(target.relative_to(ROOT)) not in PENDING:
                missing.append(f"{page.name}: {link}")
        for code in code_of(text):
            for path in re.findall(r"(?<![\w/.-])((?:configs|experiments|scripts|benchmarks)/[\w./-]+\.(?:yaml|py|sh))", code):
                if not (ROOT / path).is_file():
                    missing.append(f"{page.name}: {path}")
            for name in re.findall(r"metagate (?:run|compare|tune|sweep) ([a-z][\w-]+)(?=\s|$)", code):
                if not (ROOT / "configs" / f"{name}.yaml").is_file():
                    missing.append(f"{page.name}: ready config {name}")
    assert not missing, f"named in the docs but absent: {missing}"


def test_results_doc_and_readme_block_are_what_the_committed_summaries_give() -> None:
    doc, readme = update_docs().render()
    assert (ROOT / "docs" / "results.md").read_text() == doc, "run scripts/update_docs.py"
    assert README.read_text() == readme, "run scripts/update_docs.py"


def test_every_experiment_with_summaries_has_a_table() -> None:
    doc = (ROOT / "docs" / "results.md").read_text()
    for folder in sorted((ROOT / "results").iterdir()):
        assert (ROOT / "experiments" / f"{folder.name}.yaml").is_file(), f"results/{folder.name} has no experiments/{folder.name}.yaml"
        assert f"metagate aggregate results/{folder.name}" in doc


def test_the_readme_method_example_trains_as_a_method_of_its_own(tmp_path: Path) -> None:
    from metagate.methods import METHODS

    text = README.read_text()
    block = re.search(r"## Add a method in one file.*?```python\n(.*?)```", text, flags=re.S)
    assert block, "the README's worked example (a python block under 'Add a method in one file')"
    (tmp_path / "l2_anchor.py").write_text(block.group(1))  # saved as its own file, as the README says
    spec = importlib.util.spec_from_file_location("l2_anchor", tmp_path / "l2_anchor.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # registers l2_anchor
    try:
        args = ["run", "gated-teacher-task", "method.name=l2_anchor", "method.strength=0.1", "trainer.epochs=1", "benchmark.num_tasks=2",
                "benchmark.train_per_task=300", "benchmark.test_per_task=100", "trainer.progress=false", "--out", str(tmp_path / "run")]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert (tmp_path / "run" / "results.json").is_file()
    finally:
        METHODS._entries.pop("l2_anchor", None)
    with pytest.raises(Exception):
        METHODS.get("l2_anchor")


def test_every_test_docs_reliability_names_exists() -> None:
    """docs/reliability.md says which test holds each promise: every test it names is in the suite."""
    text = (ROOT / "docs" / "reliability.md").read_text()
    missing = []
    for row in (line for line in text.splitlines() if line.startswith("|") and "tests/" in line):
        cell = row.rstrip(" |").rsplit("|", 1)[-1]
        current = None
        for ref in re.findall(r"`([^`]+)`", cell):
            if ref.endswith(".py"):  # `tests/x.py` (`name`, `name`): a file, then its tests
                current = ref
                continue
            path, _, name = ref.rpartition("::") if "::" in ref else ("", "", ref)
            current = path or current
            name = name.split("[")[0]
            if current is None or not (ROOT / current).is_file() or f"def {name}(" not in (ROOT / current).read_text():
                missing.append(f"{current}::{name}")
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"
