"""Headless Chromium for the tests: a screenshot of a page, and what the page did when it loaded.

``page_check`` loads an instrumented copy of the page (the page itself carries no script): a first script records
uncaught errors, failed resource loads and console.error / console.warn calls, a handler on ``load`` measures
every top-level ``<svg>`` and ``<img>``; the record is read back from ``--dump-dom``. Chromium's own console log
(``--enable-logging=stderr``) is read too, so a message the instrumentation missed still counts.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

#: The names the Debian and other packages give the browser.
NAMES = ("chromium", "chromium-browser", "google-chrome")
MARKER = "data-page-check"
PROBE_HEAD = """<script>
window.__pageProblems = [];
addEventListener("error", e => __pageProblems.push(e.message || ("failed to load " + (e.target.src || e.target.href
  || e.target.tagName))), true);
for (const level of ["error", "warn"]) {
  const original = console[level];
  console[level] = (...args) => { __pageProblems.push(level + ": " + args.join(" ")); original(...args); };
}
addEventListener("load", () => {
  const figures = [...document.querySelectorAll("svg, img")].filter(e => !e.parentElement.closest("svg"));
  const sizes = figures.map(e => { const r = e.getBoundingClientRect(); return [e.tagName.toLowerCase(), r.width,
    r.height]; });
  document.documentElement.setAttribute("data-page-check", JSON.stringify({figures: sizes,
    problems: __pageProblems}));
});
</script>"""
CONSOLE = re.compile(r":CONSOLE[:(]\d*\)?\]? (.*)")


def find_chromium() -> str | None:
    """The path of a Chromium binary on PATH, None when there is none."""
    return next((path for name in NAMES if (path := shutil.which(name))), None)


def run_chromium(binary: str, args: list[str], workdir: Path) -> subprocess.CompletedProcess:
    """Run headless Chromium with a throw-away profile in ``workdir``; fails on a non-zero exit."""
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               f"--user-data-dir={workdir / 'profile'}", "--enable-logging=stderr", "--v=0", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}: {done.stderr[-2000:]}"
    return done


def screenshot(binary: str, page: Path, png: Path, workdir: Path, size: tuple[int, int] = (1200, 1600)) -> Path:
    """A PNG of ``page`` in a window of ``size`` pixels."""
    run_chromium(binary, [f"--screenshot={png}", f"--window-size={size[0]},{size[1]}", page.resolve().as_uri()],
                 workdir)
    assert png.is_file(), f"chromium wrote no screenshot at {png}"
    return png


def page_check(binary: str, page: Path, workdir: Path) -> dict:
    """{figures: [[tag, width, height]], problems: [what went wrong], console: [Chromium's console lines]} of
    ``page`` loaded in the browser."""
    probed = workdir / f"probed-{page.name}"
    text = page.read_text(encoding="utf-8")
    head = re.search(r"<head[^>]*>", text)
    assert head, f"{page} has no <head>"
    probed.write_text(text[: head.end()] + PROBE_HEAD + text[head.end():], encoding="utf-8")
    done = run_chromium(binary, ["--window-size=1200,1600", "--dump-dom", probed.resolve().as_uri()], workdir)
    record = _marker(done.stdout)
    assert record is not None, f"the page check did not run (no {MARKER} in the dumped DOM)"
    record["console"] = [m.group(1) for line in done.stderr.splitlines() if (m := CONSOLE.search(line))]
    return record


def is_blank(png: Path) -> bool:
    """Whether an image is (nearly) one colour: under 1% of its pixels differ from the most common one."""
    from PIL import Image

    image = Image.open(png).convert("RGB")
    counts = image.getcolors(maxcolors=image.width * image.height)
    return max(c for c, _ in counts) > 0.99 * image.width * image.height


def _marker(dom: str) -> dict | None:
    found: dict = {}

    class Reader(HTMLParser):
        def handle_starttag(self, tag, attrs):
            if tag == "html":
                found.update(dict(attrs))

    Reader().feed(dom)
    return json.loads(found[MARKER]) if MARKER in found else None
