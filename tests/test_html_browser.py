"""The HTML reports in a real browser: headless Chromium opens the benchmark report and the analysis
report, every image decodes, nothing is fetched from outside and the console stays clean.

A test-only copy of each page gets a small inline script that, on ``load``, writes the count of
images and of decoded images (``complete && naturalWidth > 0``) and the list of fetched resources
into the DOM; ``--dump-dom`` returns it. Console messages (errors, uncaught exceptions, failed
loads) appear on stderr with ``--enable-logging=stderr`` as lines holding ``CONSOLE``. A control
page with a broken image and a console error proves that both checks can fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from compress.reports.bench import write_bench_report
from compress.reports.analysis import write_report

from test_bench import fake_result
from test_report import _make_result

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER = os.environ.get("CHROMIUM") or next((b for b in BROWSERS if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no headless Chromium found (Debian: apt-get install "
                                                        "chromium; .ci/run installs it); browser check skipped")

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=10000")
PROBE = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var done = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  var fetched = performance.getEntriesByType("resource").map(function (r) { return r.name; });
  var out = document.createElement("pre");
  out.id = "browser-probe";
  out.textContent = JSON.stringify({images: imgs.length, decoded: done.length, fetched: fetched,
                                    widths: done.map(function (i) { return i.naturalWidth; })});
  document.body.appendChild(out);
});
</script>"""
CONSOLE = re.compile(r":CONSOLE[:(]")


def open_in_browser(html_path: Path, tmp_path: Path) -> tuple[dict, list[str]]:
    """Load a probed copy of ``html_path`` in headless Chromium; return the probe and the console lines."""
    page = tmp_path / f"probed_{html_path.name}"
    text = html_path.read_text(encoding="utf-8")
    assert text.count("</body>") == 1
    page.write_text(text.replace("</body>", PROBE + "\n</body>"), encoding="utf-8")
    profile = tmp_path / f"profile_{html_path.stem}"
    proc = subprocess.run([BROWSER, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r'<pre id="browser-probe">(.*?)</pre>', proc.stdout, re.DOTALL)
    assert found, f"the probe did not run; stderr: {proc.stderr[-2000:]}"
    probe = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    return probe, [line for line in proc.stderr.splitlines() if CONSOLE.search(line)]


def test_probe_detects_broken_images_and_console_errors(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><img alt="x" src="data:image/png;base64,AAAA">'
                   '<script>console.error("deliberate"); missingFunction();</script></body></html>')
    probe, console = open_in_browser(bad, tmp_path)
    assert probe["images"] == 1 and probe["decoded"] == 0
    assert any("deliberate" in line for line in console) and any("missingFunction" in line for line in console)


def test_bench_report_opens_in_browser(tmp_path):
    paths = write_bench_report(fake_result(), tmp_path)
    probe, console = open_in_browser(paths["html"], tmp_path)
    assert probe["images"] == 2 and probe["decoded"] == 2 and min(probe["widths"]) > 100
    assert probe["fetched"] == [] and console == []


def test_analysis_report_opens_in_browser(tmp_path):
    paths = write_report(_make_result(k=6, taps=(("features.4", 3), ("features.9", 3))), tmp_path, filters_per_tap=1)
    expected = paths["html"].read_text().count("<img ")
    probe, console = open_in_browser(paths["html"], tmp_path)
    assert expected >= 4 and probe["images"] == expected and probe["decoded"] == expected
    assert probe["fetched"] == [] and console == []
