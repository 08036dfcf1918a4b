"""`gradguard report`: the HTML references every PNG, each PNG is a real image, headless Chromium renders it, and
bad input gives a clear message, an exit code and nothing half-written."""

from __future__ import annotations

import base64
import io
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.cli import EXIT_MISSING_DEPENDENCY, EXIT_OK, EXIT_USAGE, main
from gradguard.report import ReportError, build_report, load_run

PIL = pytest.importorskip("PIL.Image")


def record_run(log_dir: Path, *, steps: int = 30, nan_at: int = 12, clipper: gg.Clipper | None = None) -> None:
    """A real run under the Guard: clipping, a non-finite batch (skipped, diagnosed), per-layer records."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gg.Monitor(log_dir, per_layer_every=5, sinks=("jsonl", "tensorboard")) as monitor:
        guard = gg.Guard(model, opt, clipper=clipper or gg.NormClip(0.5), monitor=monitor)
        for step in range(1, steps + 1):
            x, y = torch.randn(32, 4), torch.randn(32, 1)
            if step == nan_at:
                x[3, 1] = math.nan  # a corrupt sample
            guard.step(lambda x=x, y=y: nn.functional.mse_loss(model(x), y))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    record_run(root / "normclip")
    record_run(root / "zclip", clipper=gg.ZClip(warmup_steps=5))
    return root


def _images(html: str) -> dict[str, bytes]:
    found = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" data-file="([^"]+)"', html)
    return {name: base64.b64decode(b64) for b64, name in found}


def _check_png(data: bytes) -> None:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = PIL.open(io.BytesIO(data))
    img.load()
    assert img.format == "PNG" and img.width >= 600 and img.height >= 200
    lo, hi = img.convert("L").getextrema()
    assert hi - lo > 100  # not a blank canvas


def test_single_run_report_references_every_png(recorded, tmp_path):
    run_dir = tmp_path / "normclip"
    shutil.copytree(recorded / "normclip", run_dir)
    result = build_report(run_dir)
    assert result.html == run_dir / "report.html"
    html = result.html.read_text()
    embedded = _images(html)
    written = {p.name: p.read_bytes() for p in run_dir.glob("*.png")}
    assert set(written) == {"report-training.png", "report-layers.png", "report-update_ratio.png"}
    assert embedded == written  # every PNG beside the report is in it, byte for byte
    assert {p.name for p in result.images} == set(written)
    for data in written.values():
        _check_png(data)
    # the content: summary, the skipped step and its diagnosis, the layer section
    assert "nonfinite_loss" in html and "step 12" in html and "non-finite value at stage" in html
    assert "No layer flagged" in html or "Flagged layers" in html
    assert "src=\"http" not in html and "<script" not in html  # self-contained: nothing to fetch


def test_multi_run_report_and_cli(recorded, tmp_path, capsys):
    out = tmp_path / "out" / "cmp.html"
    assert main(["report", str(recorded), "-o", str(out), "--title", "two clippers"]) == EXIT_OK
    printed = capsys.readouterr().out
    assert f"report: {out}" in printed
    html = out.read_text()
    embedded = _images(html)
    written = {p.name: p.read_bytes() for p in out.parent.glob("*.png")}
    assert embedded == written
    assert {"cmp-compare_grad_norm.png", "cmp-compare_loss.png", "cmp-normclip-training.png",
            "cmp-zclip-training.png", "cmp-normclip-layers.png", "cmp-zclip-layers.png"} <= set(written)
    for data in written.values():
        _check_png(data)
    assert "<title>two clippers</title>" in html
    assert html.count("<h2 id=") == 2


def test_report_of_a_diverged_run_and_a_crash_truncated_file(tmp_path):
    run = tmp_path / "run"
    with gg.Monitor(run, per_layer_every=2) as monitor:
        w = torch.ones(4, requires_grad=True)
        for i in range(6):
            w.grad = torch.full((4,), math.inf if i >= 3 else float(i + 1))
            monitor.record(gg.NormClip(1.0)([w]), loss=torch.tensor(math.nan if i >= 3 else 1.0 / (i + 1)),
                           model=nn.Linear(1, 1))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"type":"step","step":6,"lo')  # the process died in the middle of a write
    loaded = load_run(run)
    assert len(loaded.steps) == 6 and "cut short" in loaded.warnings[0]
    result = build_report(run)
    html = result.html.read_text()
    assert "cut short" in html and ">4</td>" in html  # the first non-finite step (the 4th: steps count from 1)
    for p in result.images:
        _check_png(p.read_bytes())


def _assert_nothing_written(directory: Path, before: set[str]) -> None:
    assert {p.name for p in directory.iterdir()} == before


@pytest.mark.parametrize("content, message", [
    ('{"type":"step","step":1}\n', "first line must be the 'meta' record"),
    (None, "not valid JSON"),
    ("", "is empty"),
    ('{"type":"meta","schema":99}\n', "schema 99 is not supported"),
    ('{"type":"meta","schema":1}\n[1, 2]\n', "not a gradguard record"),
    ('{"type":"meta","schema":1}\n', "holds no step records"),
])
def test_corrupt_or_empty_jsonl_is_a_clear_error_and_nothing_is_written(recorded, tmp_path, capsys, content,
                                                                          message):
    run = tmp_path / "run"
    shutil.copytree(recorded / "normclip", run)
    path = run / "metrics.jsonl"
    if content is None:  # a corrupt line in the middle of a real file
        lines = path.read_text().splitlines(keepends=True)
        lines[5] = lines[5][: len(lines[5]) // 2] + "\n"
        path.write_text("".join(lines))
        message = r"metrics.jsonl:6: not valid JSON"
    else:
        path.write_text(content)
    before = {p.name for p in run.iterdir()}
    assert main(["report", str(run)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert err.startswith("gradguard report: error: ")
    _assert_nothing_written(run, before)
    with pytest.raises(ReportError):
        build_report(run)


def test_missing_and_empty_run_dirs(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == EXIT_USAGE
    assert "is empty" in capsys.readouterr().err
    (empty / "notes.txt").write_text("hi")
    assert main(["report", str(empty)]) == EXIT_USAGE
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert sorted(p.name for p in empty.iterdir()) == ["notes.txt"]
    assert main(["report", str(tmp_path / "nope"), "-o", str(tmp_path / "r.txt")]) == EXIT_USAGE
    assert not (tmp_path / "r.txt").exists()


def test_bad_output_path(recorded, tmp_path, capsys):
    assert main(["report", str(recorded / "normclip"), "-o", str(tmp_path / "r.pdf")]) == EXIT_USAGE
    assert "must end in .html" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_missing_matplotlib_names_the_extra(recorded, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(recorded / "normclip", run)
    before = {p.name for p in run.iterdir()}
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["report", str(run)]) == EXIT_MISSING_DEPENDENCY
    assert 'pip install "gradguard[plot]"' in capsys.readouterr().err
    _assert_nothing_written(run, before)


_CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_PROBE = ("<script>window.addEventListener('load', () => { const i = [...document.images]; "
          "document.title = 'IMAGES ' + i.length + ' ' + i.filter(x => x.complete && x.naturalWidth > 0).length; "
          "});</script></body>")


def _chromium(*args: str, user_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={user_dir}",
         "--enable-logging=stderr", "--v=0", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )


@pytest.mark.skipif(_CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(recorded, tmp_path):
    result = build_report(recorded, tmp_path / "report.html")
    n_images = len(result.images)
    # a copy with a probe that, after load, writes into the title how many images decoded
    probe = tmp_path / "probe.html"
    probe.write_text(result.html.read_text().replace("</body>", _PROBE))
    dom = _chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri(), user_dir=tmp_path / "profile1")
    assert f"<title>IMAGES {n_images} {n_images}</title>" in dom.stdout, dom.stderr[-2000:]
    # the report itself: loads without console errors or failed resources, and paints a non-blank page
    shot = tmp_path / "shot.png"
    proc = _chromium(f"--screenshot={shot}", "--window-size=1200,2000", result.html.as_uri(),
                     user_dir=tmp_path / "profile2")
    page_errors = [line for line in proc.stderr.splitlines()
                   if "CONSOLE" in line or "Uncaught" in line or "ERR_" in line or "Failed to load" in line]
    assert page_errors == []
    img = PIL.open(shot)
    assert img.size == (1200, 2000)
    colors = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50  # text and plots, not an empty or error page
