"""``fxq report RUN``: RUN/report.html from the run folder's saved artifacts alone (no model is loaded or run).

The page is self-contained: inline style and SVG figures, no scripts, nothing fetched over the network, so it
can be opened anywhere and sent as one file.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="RUN/report.html from an `fxq pipeline` run folder's artifacts",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="the --out folder of an `fxq pipeline` run")
    p.set_defaults(func=run)


def build_report(run_folder: str | Path) -> Path:
    """Write ``run_folder/report.html`` from the folder's artifacts and return its path."""
    from fxq.cli.report_html import render_report
    from fxq.cli.run_artifacts import REPORT, read_run
    from fxq.io import write_atomic

    folder = Path(run_folder)
    page = render_report(read_run(folder), title=f"run folder {folder.resolve().name}")
    write_atomic(folder / REPORT, lambda f: f.write(page.encode("utf-8")), mode="wb")
    return folder / REPORT


def run(args: argparse.Namespace) -> int:
    print(f"report: {build_report(args.run)}")
    return 0
