"""HTML reports: one self-contained file whose plots really render (checked in headless Chromium)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner

from logitcache.cli.main import main
from logitcache.html import write_report
from logitcache.report import fidelity, inspect_cache
from conftest import C

PIL = pytest.importorskip("PIL.Image")
TEACHERS = ["toy_teachers:toy_a", "toy_teachers:toy_b"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


@pytest.fixture(scope="module")
def fidelity_report(dumper, dataset, tmp_path_factory):
    """A multilabel top-4 float16 cache's fidelity report, written as HTML."""
    cache = dumper(epochs=1, output_kind="multilabel", augment="ced", topk=4, value_dtype="float16")
    result = fidelity(cache, dataset, TEACHERS, samples=16, device="cpu")
    path = tmp_path_factory.mktemp("html") / "report.html"
    write_report(path, fidelity=result, inspect=inspect_cache(cache), title="test report")
    return path, result


def _colours(a: np.ndarray) -> int:
    """Distinct RGB colours of an image array ``[H, W, 3]``."""
    return len(np.unique(a.reshape(-1, 3).astype(np.uint32) @ np.array([65536, 256, 1], np.uint32)))


def _images(text: str) -> list:
    found = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    return [PIL.open(io.BytesIO(base64.b64decode(m))) for m in found]


def test_report_is_one_self_contained_file(fidelity_report):
    path, result = fidelity_report
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    # nothing to fetch: no scripts, no external links or stylesheets; every picture is inline
    assert "<script" not in text and "http://" not in text and "https://" not in text and "<link" not in text
    images = _images(text)
    assert len(images) == 5  # error vs k', tail histogram, class coverage, size vs fidelity, disagreement
    for im in images:
        assert im.format == "PNG" and im.width >= 400 and im.height >= 250
        assert _colours(np.asarray(im.convert("RGB"))) > 30  # drawn plots, not an empty canvas
    # the tables carry the JSON's numbers
    assert "Per k&#x27;" in text or "Per k'" in text
    for row in result["per_k"]:
        assert f"<td class=\"n\">{row['k']}</td>" in text


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package 'chromium'; .ci/run "
                                              "installs it): cannot check that the HTML report renders")
def test_report_renders_in_headless_chromium(fidelity_report, tmp_path):
    """A screenshot of the page, and of the same page with its pictures removed: the plots add
    thousands of colours (lines, markers, colour maps, anti-aliased text) that text and tables alone
    do not, so a broken or blank image shows up as a near-identical screenshot."""
    path, _ = fidelity_report
    stripped = tmp_path / "stripped.html"
    stripped.write_text(re.sub(r'src="data:image/png;base64,[^"]+"', 'src=""', path.read_text()))

    def shot(page, name):
        png = tmp_path / f"{name}.png"
        cmd = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / ('profile-' + name)}",
               "--window-size=1280,2600", f"--screenshot={png}", page.resolve().as_uri()]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        assert png.is_file(), f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-500:]}"
        return np.asarray(PIL.open(png).convert("RGB"))

    full, bare = shot(path, "full"), shot(stripped, "bare")
    assert full.shape == (2600, 1280, 3)
    non_white = float((full.min(axis=2) < 235).mean())
    assert _colours(full) > 1000 and _colours(full) > 2 * _colours(bare), (_colours(full), _colours(bare))
    assert non_white > 0.08, non_white
    # the first plot (the wide KL-vs-k' figure) is drawn where the stripped page has only a frame
    diff = np.abs(full.astype(int) - bare.astype(int)).max(axis=2) > 40
    assert diff.mean() > 0.05


def test_fidelity_html_and_json_through_the_cli(dataset, dumper, tmp_path):
    cache = dumper(epochs=1, output_kind="multilabel", augment="ced", topk=4, value_dtype="float16")
    out = tmp_path / "f.html"
    args = ["fidelity", str(cache), "--data", str(dataset), "--teacher", TEACHERS[0], "--teacher", TEACHERS[1],
            "--samples", "6", "--device", "cpu", "--html", str(out)]
    result = CliRunner().invoke(main, args + ["--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)  # still exactly one JSON object on stdout
    assert f"report written to {out}" in result.stderr and len(_images(out.read_text())) == 5
    for key in ("samples_checked", "max_abs_logit_error", "topk_index_agreement", "top1_agreement", "kl_mean",
                "per_k", "dtype_effect", "tail_mass", "per_class", "disagreement"):
        assert key in r
    text = CliRunner().invoke(main, args[:-2]).stdout
    assert "per k' (the cache truncated to its top k'; 6 rows):" in text
    assert "value dtype" in text and "least covered classes" in text and "teachers (re-run)" in text
    lines = text.splitlines()
    table = lines[lines.index("per k' (the cache truncated to its top k'; 6 rows):") + 3:][:4]
    assert [ln.split()[0] for ln in table] == ["1", "2", "3", "4"]
    assert float(table[3].split()[1]) == pytest.approx(r["per_k"][3]["kl_mean"], rel=2e-3)  # 3-4 digits shown


@pytest.mark.parametrize("command", ["plan", "compare"])
def test_new_commands_have_help_with_an_example(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0 and "Example:" in result.stdout and f"logitcache {command} " in result.stdout


def test_nothing_to_report_and_missing_folder(tmp_path):
    import logitcache

    with pytest.raises(logitcache.LogitCacheError, match="nothing to report"):
        write_report(tmp_path / "x.html")
    with pytest.raises(logitcache.LogitCacheError, match="does not exist"):
        write_report(tmp_path / "no" / "x.html", plan={"epochs": 1, "samples": 1, "topk": 1, "classes": C,
                                                       "members": 0, "value_dtype": "float16", "method": "m",
                                                       "backends": []})
