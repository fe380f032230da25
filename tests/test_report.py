"""The HTML report of an exp dir (``emdist.report.html``): ``EXP_DIR/report.html``.

What is proved, on the real exp dirs of ``test_plots`` (word GMMs and a global GMM, written
by the CLI in process): the report is one self-contained file (no external resource; every
image a ``data:image/png;base64`` PNG that decodes to the size its tag gives) with the
sections and tables the data call for (iteration rows = ``metrics.jsonl`` records, confusion
rows = labels, misrecognised rows = ``n_errors``, a score per word); text from the exp dir
is escaped; an exp dir of older ``metrics.jsonl`` records, or no matplotlib, still gives a
report (the latter with a one-line note instead of the plots); a missing exp dir is a
one-line error. In a real headless Chromium (skipped, saying so, when there is none): the
images decode (``data-images-loaded`` set by the page's script equals the number of
images), the tables are all there, and a screenshot is not blank.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_plots import NEED_MPL, PNG_SIGNATURE, build_exp_dirs, png_size, strip_new_metrics

from emdist.errors import UserError
from emdist.report import write_report
from emdist.report.html import build_report
from emdist.report.plots import MATPLOTLIB_NOTE


class Page(HTMLParser):
    """What the tests look at in a report: sections, tables (class, header, body rows),
    images, elements loading anything, and the text."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: list[str] = []
        self.tables: list[dict] = []
        self.images: list[dict] = []
        self.external: list[tuple[str, str]] = []
        self.scripts = 0
        self.h1 = ""
        self.text: list[str] = []
        self._in: list[str] = []
        self._cell: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self._in.append(tag)
        if tag == "section" and attrs.get("id"):
            self.sections.append(attrs["id"])
        elif tag == "table":
            self.tables.append({"class": attrs.get("class", ""), "header": [], "rows": []})
        elif tag == "tr" and self.tables:
            row: list[str] = []
            if "tbody" in self._in:
                self.tables[-1]["rows"].append(row)
            else:
                self.tables[-1]["header"] = row
        elif tag in ("td", "th"):
            self._cell = []
            self._cell_class = attrs.get("class") or ""
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "script":
            self.scripts += 1
            if attrs.get("src"):
                self.external.append((tag, attrs["src"]))
        if tag == "link" or (tag != "img" and attrs.get("src")) or \
                (tag == "a" and attrs.get("href", "").startswith(("http:", "https:"))):
            self.external.append((tag, attrs.get("href") or attrs.get("src") or ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self.tables:
            table = self.tables[-1]
            target = table["rows"][-1] if table["rows"] and "tbody" in self._in \
                else table["header"]
            target.append(("".join(self._cell).strip(), self._cell_class))
            self._cell = None
        while self._in:
            if self._in.pop() == tag:
                break

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._in and self._in[-1] == "h1":
            self.h1 += data
        if not (self._in and self._in[-1] in ("script", "style")):
            self.text.append(data)

    def table(self, css: str) -> dict:
        (found,) = [t for t in self.tables if css in t["class"].split()]
        return found


@pytest.fixture(scope="module")
def exps(tmp_path_factory) -> dict[str, Path]:
    return build_exp_dirs(tmp_path_factory.mktemp("report"))


def _metrics(exp: Path) -> list[dict]:
    return [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]


def _results(exp: Path) -> dict:
    return json.loads((exp / "decode_test" / "results.json").read_text())


def _check_images(page: Page, expected: list[str]) -> None:
    assert [img["alt"] for img in page.images] == expected
    for img in page.images:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix), img["alt"]
        data = base64.b64decode(img["src"][len(prefix):], validate=True)
        assert data.startswith(PNG_SIGNATURE)
        assert png_size(data) == (int(img["width"]), int(img["height"])), img["alt"]


def _check_common(page: Page, exp: Path) -> None:
    assert page.h1 == f"emdist report: {exp.name}"
    assert page.sections[:4] == ["config", "iterations", "plots", "decodes"]
    assert page.external == []
    assert page.scripts == 1  # the inline one that counts decoded images
    config = json.loads((exp / "config.json").read_text())
    options = dict((row[0][0], row[1][0]) for row in page.table("config")["rows"])
    assert options["model"] == config["model"]
    assert options["num_iters"] == str(config["num_iters"])
    assert options["mstep.style"] == config["mstep"]["style"]
    iterations = page.table("iterations")
    assert [c[0] for c in iterations["header"]] == [
        "iter", "log-likelihood per frame", "frames", "Gaussians", "floored", "removed",
        "seconds"]
    metrics = _metrics(exp)
    assert len(iterations["rows"]) == len(metrics)
    for row, record in zip(iterations["rows"], metrics, strict=True):
        assert int(row[0][0]) == record["iter"]
        assert float(row[1][0]) == pytest.approx(record["loglike_per_frame"], abs=1e-6)
        assert int(row[2][0]) == record["frames"]


def test_word_model_report(exps):
    pytest.importorskip("matplotlib", reason=NEED_MPL)
    exp = exps["word"]
    path = write_report(exp)
    assert path == exp / "report.html"
    assert [p.name for p in exp.iterdir() if p.name.startswith(".")] == []  # no tmp left
    page = Page(path.read_text())
    _check_common(page, exp)
    _check_images(page, ["loglike.png", "confusion_decode_test.png", "occupancy.png"])
    results = _results(exp)
    labels = results["labels"]
    assert len(labels) == 11
    (summary,) = page.table("results")["rows"]
    assert [c[0] for c in summary] == [f"{100 * results['error_rate']:.2f}%",
                                       f"{100 * results['accuracy']:.2f}%",
                                       str(results["n_utts"]), str(results["n_errors"])]
    confusion = page.table("confusion")
    assert [c[0] for c in confusion["header"]] == ["ref \\ hyp", *labels, "errors"]
    assert len(confusion["rows"]) == len(labels)
    for row, label, counts in zip(confusion["rows"], labels, results["confusion"],
                                  strict=True):
        assert row[0][0] == label
        assert [int(c[0]) for c in row[1:-1]] == counts
    assert results["n_errors"] > 0  # the subset is small enough to make a few
    wrong = page.table("misrecognised")
    assert [c[0] for c in wrong["header"]] == ["utt", "ref", "hyp", *labels]
    assert len(wrong["rows"]) == results["n_errors"]
    errors = [u for u in results["utts"] if u["ref"] != u["hyp"]]
    for row, utt in zip(wrong["rows"], errors, strict=True):
        assert [c[0] for c in row[:3]] == [utt["utt"], utt["ref"], utt["hyp"]]
        scores = [float(c[0]) for c in row[3:]]
        assert scores == pytest.approx([utt["scores"][lab] for lab in labels], abs=0.051)
        best = [lab for lab, c in zip(labels, row[3:], strict=True) if "best" in c[1]]
        assert best == [utt["hyp"]]


def test_global_model_report(exps):
    pytest.importorskip("matplotlib", reason=NEED_MPL)
    exp = exps["global"]
    page = Page(write_report(exp).read_text())
    _check_common(page, exp)
    _check_images(page, ["loglike.png", "weights.png", "occupancy.png"])
    results = _results(exp)
    assert not [t for t in page.tables if t["class"] in ("confusion", "misrecognised")]
    (summary,) = page.table("results")["rows"]
    assert float(summary[0][0]) == pytest.approx(results["loglike_per_frame"], abs=1e-6)
    assert [c[0] for c in summary[1:]] == [str(results["n_utts"]), str(results["n_frames"])]
    (quantiles,) = page.table("utt-summary")["rows"]
    per_frame = sorted(u["score"] / u["frames"] for u in results["utts"])
    assert float(quantiles[0][0]) == pytest.approx(per_frame[0], abs=1e-3)
    assert float(quantiles[-1][0]) == pytest.approx(per_frame[-1], abs=1e-3)
    worst = page.table("worst-utts")["rows"]
    assert len(worst) == min(10, results["n_utts"])
    assert float(worst[0][3][0]) == pytest.approx(per_frame[0], abs=1e-3)


def test_older_metrics_and_hostile_text_are_handled(exps, tmp_path):
    pytest.importorskip("matplotlib", reason=NEED_MPL)
    exp = strip_new_metrics(exps["word"], tmp_path / "old<&>")
    results = _results(exp)
    wrong = next(u for u in results["utts"] if u["ref"] != u["hyp"])
    wrong["utt"] = '<script>alert("x")</script>&amp;'
    (exp / "decode_test" / "results.json").write_text(json.dumps(results))
    text = write_report(exp).read_text()
    page = Page(text)
    assert page.scripts == 1 and "<script>alert" not in text
    assert page.h1 == "emdist report: old<&>"
    assert page.table("misrecognised")["rows"][0][0][0] == wrong["utt"]
    _check_images(page, ["loglike.png", "confusion_decode_test.png"])
    assert len(page.table("iterations")["rows"]) == len(_metrics(exp))


def test_without_matplotlib_the_report_says_so(exps, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    page = Page(build_report(exps["word"]))
    assert page.images == []
    assert MATPLOTLIB_NOTE in [t.strip() for t in page.text]
    assert len(page.table("iterations")["rows"]) == len(_metrics(exps["word"]))
    assert len(page.table("confusion")["rows"]) == 11


def test_a_missing_exp_dir_is_one_line(tmp_path):
    with pytest.raises(UserError) as info:
        write_report(tmp_path / "nowhere")
    assert "\n" not in str(info.value) and "emdist train" in str(info.value)
    assert not (tmp_path / "nowhere").exists()


# -- a real browser ----------------------------------------------------------------------


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no headless browser: install Debian's chromium (apt-get install chromium) "
                "to check that the report renders")


def _browser(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-dev-shm-usage", "--no-first-run", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'chromium-profile'}",
               "--virtual-time-budget=5000", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.mark.parametrize("kind", ["word", "global"])
def test_the_report_renders_in_a_headless_browser(exps, kind, tmp_path):
    pytest.importorskip("matplotlib", reason=NEED_MPL)
    _chromium()
    path = write_report(exps[kind])
    page = Page(path.read_text())
    assert len(page.images) == 3
    dom = _browser(tmp_path, "--dump-dom", path.resolve().as_uri()).stdout
    body = Page(dom)
    assert len(body.tables) == len(page.tables) > 0
    marker = f'data-images-loaded="{len(page.images)}"'
    assert marker in dom, dom[:300]
    assert f'data-tables="{len(page.tables)}"' in dom


def test_a_screenshot_of_the_report_is_not_blank(exps, tmp_path):
    pytest.importorskip("matplotlib", reason=NEED_MPL)
    from PIL import Image

    _chromium()
    path = write_report(exps["word"])
    shot = tmp_path / "shot.png"
    _browser(tmp_path, f"--screenshot={shot}", "--window-size=1200,2000",
             path.resolve().as_uri())
    data = shot.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert png_size(data) == (1200, 2000)
    with Image.open(shot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "the screenshot is (nearly) blank"
    # the page is mostly white, but not only: text, table borders and the plots
    white = max(count for count, rgb in colours if rgb == (255, 255, 255))
    assert white < 0.95 * 1200 * 2000
