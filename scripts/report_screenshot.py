"""Make the report of a run folder (or a folder of runs) and screenshot its top in headless chromium:
the README's picture of a report, never drawn by hand.

    .venv/bin/python scripts/report_screenshot.py RUN_OR_SWEEP_DIR [--out docs/figures/report.png] [--size 1200x1500]

The README's picture: ``metagate compare digits-permuted --methods finetune,ewc,xdg --seeds 2 --out runs/rep-cmp``,
then this script on ``runs/rep-cmp``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from metagate.report_page import write_report  # noqa: E402
from metagate.runs import atomic_write_bytes  # noqa: E402

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--force-device-scale-factor=1",
]


def screenshot(html: Path, out: Path, width: int, height: int) -> None:
    """``html`` as rendered by headless chromium in a ``width`` x ``height`` window, as the PNG ``out``."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("error: chromium is not installed (apt-get install chromium); the report itself was written")
    with tempfile.TemporaryDirectory() as tmp:
        shot = Path(tmp) / "shot.png"
        subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp}/profile", f"--window-size={width},{height}",
             f"--screenshot={shot}", html.resolve().as_uri()],
            check=True, capture_output=True, timeout=120,
        )
        atomic_write_bytes(out, shot.read_bytes())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="a run folder or a folder of runs (compare, tune)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "figures" / "report.png")
    p.add_argument("--size", default="1200x1500", help="window WIDTHxHEIGHT in pixels (the top of the page is shown)")
    args = p.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    html, _ = write_report(args.folder)
    screenshot(html, args.out, width, height)
    print(f"{html} -> {args.out}")


if __name__ == "__main__":
    main()
