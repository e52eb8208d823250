"""The report of a real run, opened in headless chromium: the page paints, every image decodes, and the
console stays silent (a negative control shows the console check catches an error)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium): the report is not checked in a browser"
)
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--force-device-scale-factor=1",
    "--enable-logging=stderr", "--v=0",
]


@dataclass
class Seen:
    """What chromium made of a page: its DOM after loading, its console messages, and its screenshot's
    distinct colours and fraction of colourful pixels (plots; text and tables are grey)."""

    dom: str
    console: list[str]
    colours: int
    colourful: float

    def images_ok(self) -> str:
        """What the page's own script wrote after loading: decoded images / all images."""
        marker = 'data-images-ok="'
        assert marker in self.dom, "the page's load script did not run"
        return self.dom.split(marker, 1)[1].split('"', 1)[0]


def open_in_chromium(page: Path, tmp: Path) -> Seen:
    """Load ``page`` once in headless chromium (own profile): DOM to stdout, console to stderr, a 1200 x 1600 screenshot."""
    import matplotlib.image as mpimg

    shot = tmp / "shot.png"
    cmd = [str(CHROMIUM), *FLAGS, f"--user-data-dir={tmp / 'profile'}", "--window-size=1200,1600", f"--screenshot={shot}",
           "--dump-dom", page.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=True)
    pixels = (mpimg.imread(shot)[..., :3] * 255).astype(np.int32)
    colours = len(np.unique((pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]))
    colourful = float(((pixels.max(axis=2) - pixels.min(axis=2)) > 60).mean())
    return Seen(done.stdout, [line for line in done.stderr.splitlines() if ":CONSOLE" in line], colours, colourful)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report of a small XdG run with a fine-tuning reference, trained here."""
    from metagate import orchestrate
    from metagate.config import config_from_dict
    from metagate.report_page import write_report

    raw = {
        "seed": 0,
        "benchmark": {"name": "gated_teacher", "num_tasks": 3, "train_per_task": 300, "test_per_task": 100},
        "method": {"name": "xdg", "backbone": {"hidden": [32, 32]}},
        "reference": {"name": "finetune"},
        "trainer": {"epochs": 1, "batch_size": 64, "progress": False, "curve_every": 2},
    }
    folder = tmp_path_factory.mktemp("browser") / "run"
    orchestrate.run_with_reference(config_from_dict(raw), folder, False)
    html, _ = write_report(folder)
    return html


@pytest.fixture(scope="module")
def seen(report: Path, tmp_path_factory: pytest.TempPathFactory) -> Seen:
    return open_in_chromium(report, tmp_path_factory.mktemp("chromium"))


def test_every_image_decodes(report: Path, seen: Seen) -> None:
    count = report.read_text().count("<img ")
    assert count >= 5 and seen.images_ok() == f"{count}/{count}"


def test_the_console_is_silent(seen: Seen) -> None:
    assert seen.console == []  # a report page writes nothing there: any message is an error or a warning


def test_the_page_paints_its_plots(seen: Seen) -> None:
    # measured: this page ~3000 colours, 3% colourful; a report without its images ~220 colours, 0%
    assert seen.colours > 1000 and seen.colourful > 0.01, (seen.colours, seen.colourful)


def test_the_checks_catch_a_broken_page(tmp_path: Path) -> None:
    """Negative control: a console error, a script error, an image that does not decode and a page
    without plots are all seen."""
    from metagate.report_page import Markdown, render_html

    page = tmp_path / "broken.html"
    html = render_html([Markdown("a page", tmp_path)], "broken")
    bad = '<img src="data:image/png;base64,AAAA"><script>console.error("boom"); not_defined();</script>'
    page.write_text(html.replace("</body>", bad + "</body>"))
    broken = open_in_chromium(page, tmp_path)
    assert broken.images_ok() == "0/1"
    assert any('"boom"' in m for m in broken.console) and any("ReferenceError" in m for m in broken.console), broken.console
    assert broken.colours < 1000 and broken.colourful < 0.01  # a page of text alone fails the paint check
