"""`gradguard report`: the HTML references every PNG, each PNG is a real image, headless Chromium renders it, and
bad input gives a clear message, an exit code and nothing half-written."""

from __future__ import annotations

import base64
import io
import json
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
    written = {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in run_dir.glob("report_files/*.png")}
    assert set(written) == {"report_files/training.png", "report_files/layers.png", "report_files/update_ratio.png"}
    assert embedded == written  # every PNG in the report's folder is in it, byte for byte
    assert {p.relative_to(run_dir).as_posix() for p in result.images} == set(written)
    assert not list(run_dir.glob("*.png"))  # nothing beside the HTML
    for data in written.values():
        _check_png(data)
    # the content: summary, the skipped step and its diagnosis, the layer section
    assert "nonfinite_loss" in html and "step 12" in html and "non-finite value at stage" in html
    assert "No layer flagged" in html or "Flagged layers" in html
    assert "src=\"http" not in html and "<script" not in html  # self-contained: nothing to fetch


def test_multi_run_report_and_cli(recorded, tmp_path, capsys):
    out = tmp_path / "out" / "cmp.html"
    out.parent.mkdir()  # `gradguard report -o` creates no directories (a typo is an error, tests/test_cli.py)
    assert main(["report", str(recorded), "-o", str(out), "--title", "two clippers"]) == EXIT_OK
    printed = capsys.readouterr().out
    assert f"report: {out}" in printed
    html = out.read_text()
    embedded = _images(html)
    written = {p.relative_to(out.parent).as_posix(): p.read_bytes() for p in out.parent.glob("cmp_files/*.png")}
    assert embedded == written
    assert {f"cmp_files/{n}.png" for n in ("compare_grad_norm", "compare_loss", "normclip-training", "zclip-training",
                                            "normclip-layers", "zclip-layers")} <= set(written)
    assert [p.name for p in out.parent.iterdir()] == ["cmp_files", "cmp.html"] or \
        sorted(p.name for p in out.parent.iterdir()) == ["cmp.html", "cmp_files"]
    for data in written.values():
        _check_png(data)
    assert "<title>two clippers</title>" in html
    assert html.count("<h2 id=") == 3  # the summary and one section per run
    # the table of contents links every run's section
    for anchor in ("run-normclip", "run-zclip"):
        assert f'<a href="#{anchor}">' in html and f'<h2 id="{anchor}">' in html


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
    page = result.html.read_text()
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="[^"]+">', page)
    assert csp is not None and "script" not in csp.group(0) and "default-src 'none'" in csp.group(0)
    probe = tmp_path / "probe.html"  # the probe is a script: it runs only without the page's CSP
    probe.write_text(page.replace(csp.group(0), "").replace("</body>", _PROBE))
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


@pytest.mark.skipif(_CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_content_security_policy_blocks_script_in_chromium(recorded, tmp_path):
    """Even if a value slipped through unescaped, the page's CSP stops script: the same probe, CSP kept, never runs."""
    result = build_report(recorded / "normclip", tmp_path / "report.html")
    page = result.html.read_text()
    for name, html_text in (("with_csp", page), ("without_csp", re.sub(r'<meta http-equiv="Content-Security-Policy"'
                                                                       r' content="[^"]+">', "", page))):
        f = tmp_path / f"{name}.html"
        f.write_text(html_text.replace("</body>", "<script>document.title = 'PWNED';</script></body>"))
        dom = _chromium("--virtual-time-budget=5000", "--dump-dom", f.as_uri(), user_dir=tmp_path / f"p_{name}")
        ran = "<title>PWNED</title>" in dom.stdout
        assert ran == (name == "without_csp"), (name, dom.stderr[-1500:])  # the control proves the probe works


# --------------------------------------------------------------------------------- the report tells the truth
from gradguard.report import clip_rates, layer_grid, render, summarize  # noqa: E402
from gradguard.runlog import JSONL_NAME, meta_record, record  # noqa: E402


def _write(run_dir: Path, records: list[dict]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / JSONL_NAME).write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in records))
    return run_dir


def _meta() -> dict:
    return meta_record(torch="2.0", every=1, per_layer_every=1, sinks=["jsonl"])


def _section(html: str, run_anchor: str, title: str = "Skipped and non-finite steps") -> str:
    start = html.index(f'<h2 id="{run_anchor}">')
    part = html[start:]
    nxt = part.find("<h2 id=", 10)
    part = part if nxt < 0 else part[:nxt]
    return part[part.index(f"<h3>{title}</h3>"):]


def test_a_run_without_guard_that_went_nan_lists_every_bad_step_in_red(tmp_path):
    """The summary says 'first non-finite 41': the run's section must list step 41 (and every later one), in red."""
    run = tmp_path / "noguard"
    with gg.Monitor(run) as monitor:
        w = torch.ones(3, requires_grad=True)
        clip = gg.NormClip(1.0)
        for i in range(1, 51):  # Monitor steps are 1-based: step i is the i-th recorded step
            bad = i >= 41
            w.grad = torch.full((3,), math.nan if bad else 0.1 * (i % 7))
            monitor.record(clip([w]), loss=torch.tensor(math.nan if bad else 1.0 / (i + 1)))
    html = build_report(run).html.read_text()
    assert summarize(load_run(run))["first_nonfinite_step"] == 41
    assert re.search(r"<td class=bad>41</td>", html)  # the summary
    events = _section(html, "run-noguard")
    assert "No skipped or non-finite step" not in events and "class=ok" not in events
    assert "<p class=bad>10 skipped or non-finite step(s)" in events
    for step in range(41, 51):
        assert f"<p class=bad>step {step} — loss nan, norm nan (not skipped: the update was applied)</p>" in events


def _steps_log(norms: list[float], clipped: list[bool]) -> list[dict]:
    out, c = [_meta()], 0
    for i, (n, k) in enumerate(zip(norms, clipped)):
        c += k
        out.append(record("step", step=i, time=float(i), loss=encode(n), norm=encode(n), norm_after=encode(n),
                          threshold=1.0, coef=1.0, clipped=k, skipped=False, steps_seen=i + 1, clipped_count=c,
                          skipped_count=0))
    return out


def encode(x: float) -> float | str:
    return x if math.isfinite(x) else ("nan" if math.isnan(x) else "inf")


def test_clip_rate_counts_only_steps_with_a_finite_norm(tmp_path):
    # 10 steps: 0-3 clipped, 4 and 5 NaN (neither clipped nor unclipped), 6-9 not clipped
    norms = [2.0] * 4 + [math.nan, math.inf] + [0.5] * 4
    clipped = [True] * 4 + [False] * 6
    log = [*_steps_log(norms, clipped), record("end", steps_seen=10, clipped_count=4, skipped_count=0)]
    run_dir = _write(tmp_path / "r", log)
    run = load_run(run_dir)
    assert summarize(run)["clip_rate"] == pytest.approx(4 / 8)  # not 4 / 10
    x, rolling, cumulative = clip_rates(run, window=3)
    assert x.tolist() == list(range(10))
    # hand-computed: finite steps seen f = 1,2,3,4,4,4,5,6,7,8; clipped c = 1,2,3,4,4,4,4,4,4,4
    assert cumulative.tolist() == pytest.approx([1, 1, 1, 1, 1, 1, 4 / 5, 4 / 6, 4 / 7, 4 / 8])
    # window 3: (c_i - c_{i-3}) / (f_i - f_{i-3}); at i=5 the window holds steps 3-5: 1 clipped of 1 finite
    assert rolling[:3].tolist() == pytest.approx([1, 1, 1])
    assert rolling[3:].tolist() == pytest.approx([3 / 3, 2 / 2, 1 / 1, 0 / 1, 0 / 2, 0 / 3, 0 / 3])
    html = build_report(run_dir).html.read_text()
    assert "<td>50%</td>" in html


def test_heatmaps_share_their_columns_and_mark_the_nan_step_in_every_panel(tmp_path):
    names = ["enc.weight", "enc.bias", "head.weight"]
    log = [_meta()]
    for i in range(5):
        bad = i == 2
        log.append(record("step", step=i, loss="nan" if bad else 1.0, norm="nan" if bad else 1.0, norm_after=None,
                          threshold=None, coef=None, clipped=None, skipped=bad, reason="nonfinite_grad" if bad else None,
                          steps_seen=i + 1, clipped_count=0, skipped_count=int(i >= 2)))
        log.append(record("layers", step=i, names=names, grad_norm=["nan", 1.0, 2.0] if bad else [1.0, 2.0, 3.0],
                          param_norm=[1.0, 1.0, 1.0],
                          update_ratio=None if i in (0, bad and 2) else [1e-3, 2e-3, 0.0]))
    run_dir = _write(tmp_path / "r", log)
    run = load_run(run_dir)
    grad, ratio = layer_grid(run, "grad_norm"), layer_grid(run, "update_ratio")
    assert grad.steps == ratio.steps == [0, 1, 2, 3, 4]  # no column dropped where update_ratio is null
    assert grad.marked.tolist() == ratio.marked.tolist() == [False, False, True, False, False]
    assert grad.bad[:, 2].tolist() == [True, False, False] and not ratio.present[:, 2].any()
    assert ratio.bad[:, 1].tolist() == [False, False, True]  # the zero ratio: red
    assert ratio.logged[0, 1] == pytest.approx(-3.0) and grad.logged[2, 0] == pytest.approx(math.log10(3.0))
    result = build_report(run_dir)
    assert {p.name for p in result.images} == {"training.png", "layers.png", "update_ratio.png"}
    for p in result.images:
        _check_png(p.read_bytes())


def test_long_runs_are_drawn_from_bounded_summaries_that_keep_spikes_and_nan():
    import numpy as np

    from gradguard.report import _envelope, _spans

    n = 100_003
    x = np.arange(n, dtype=np.int64)
    y = np.ones(n)
    y[77_777], y[12_345] = 50.0, 0.01
    ex, ey = _envelope(x, y, k=100)
    assert len(ex) <= 200 and 50.0 in ey.tolist() and 0.01 in ey.tolist()
    assert ex[ey.tolist().index(50.0)] == 77_777 and (np.diff(ex) >= 0).all()
    bad = np.zeros(n, bool)
    bad[99_000] = True  # one NaN step among 100k: still shaded, at the right place
    (start, width), = _spans(x, bad, k=100)
    assert start <= 99_000 <= start + width and width < n / 50
    # many layer records merge into bounded columns, and a NaN column is still marked
    log_rows = []
    for i in range(3000):
        log_rows.append({"type": "layers", "step": i, "names": ("a", "b"), "param_norm": None, "update_ratio": None,
                         "grad_norm": __import__("array").array("d", [math.nan if i == 2500 else 1.0, float(i + 1)])})
    from gradguard.runlog import RunData, StepTable
    run = RunData(name="r", path=Path("."), meta={"type": "meta"}, steps=StepTable(), layers=log_rows)
    g = layer_grid(run, "grad_norm", max_columns=100)
    assert g.logged.shape == (2, 100) and g.marked.sum() == 1 and g.steps[g.marked.argmax()] <= 2500
    assert g.logged[1].max() == pytest.approx(math.log10(3000))  # the largest value of each merged column


def test_layer_and_run_names_that_matplotlib_would_parse_as_math(tmp_path):
    names = [r"lr$\alpha{$", "$x^{", r"\frac{"]
    log = [_meta(), record("step", step=0, loss=1.0, norm=1.0, norm_after=1.0, threshold=1.0, coef=1.0,
                           clipped=False, skipped=False, steps_seen=1, clipped_count=0, skipped_count=0),
           record("layers", step=0, names=names, grad_norm=[1.0, 2.0, 3.0], param_norm=[1.0] * 3,
                  update_ratio=[0.1] * 3),
           record("health", step=0, layer=names[0], flag="exploding", value=0.95, message="m")]
    root = tmp_path / "runs"
    _write(root / "a$b^{", log)
    _write(root / "c", log)
    result = build_report(root)
    html = result.html.read_text()
    assert "a$b^{" in html and html_escape(names[0]) in html
    for p in result.images:
        _check_png(p.read_bytes())


def html_escape(s: str) -> str:
    import html as h
    return h.escape(s, quote=True)


_XSS = '"><script>alert(1)</script><img src=x onerror=alert(2)>'


def test_a_crafted_log_cannot_inject_markup(tmp_path):
    """Every string of the log reaches the page escaped; numeric fields carrying markup are refused outright."""
    log = [{**_meta(), "gradguard": _XSS},
           record("step", step=0, loss=1.0, norm=math.inf and "inf", norm_after=1.0, threshold=1.0, coef=1.0,
                  clipped=False, skipped=True, reason=_XSS, steps_seen=1, clipped_count=0, skipped_count=1),
           record("layers", step=0, names=[_XSS, "b"], grad_norm=[1.0, 2.0], param_norm=None, update_ratio=None),
           record("health", step=0, layer=_XSS, flag="exploding", value=0.99, message=_XSS),
           record("event", step=0, skipped=True, reason=_XSS, diagnosis={"x": _XSS}, text=_XSS)]
    run_dir = _write(tmp_path / _XSS.replace("/", "_"), log)
    result = build_report(run_dir, tmp_path / "out.html", title=_XSS)
    page = result.html.read_text()
    assert "<script" not in page and "onerror=alert" not in page.replace("onerror=alert(2)&gt;", "")
    assert page.count("<img ") == len(result.images) and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:;' in page
    # the numeric fields the old report printed raw: a string there is a ReportError, nothing is written
    for kind, key in (("step", "steps_seen"), ("end", "skipped_count"), ("health", "step"), ("event", "step")):
        bad = [dict(r) for r in log] + [record("end", steps_seen=1, clipped_count=0, skipped_count=1)]
        target = next(r for r in bad if r["type"] == kind)
        target[key] = _XSS
        d = _write(tmp_path / f"bad_{kind}", bad)
        with pytest.raises(ReportError, match=rf"field '{key}'"):
            build_report(d)
        assert [p.name for p in d.iterdir()] == [JSONL_NAME]


# ---------------------------------------------------------------------------------------- fuzz: loader + renderer
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-(2**60), 2**60), st.floats(),
                    st.sampled_from(["nan", "inf", "-inf", "", "$", r"lr$\alpha{$", "<b>", "nonfinite"]),
                    st.lists(st.one_of(st.floats(), st.sampled_from(["nan", "inf"])), max_size=4))


@st.composite
def _fuzzed_log(draw) -> str:
    names = draw(st.lists(st.sampled_from(["w", "b", r"$\x", "a{", "<i>"]), min_size=1, max_size=3))
    log = [_meta()]
    for i in range(draw(st.integers(1, 6))):
        log.append(record("step", step=draw(st.integers(-5, 10**12)), time=float(i), loss=1.0, norm=2.0,
                          norm_after=1.0, threshold=1.0, coef=0.5, clipped=True, skipped=False, steps_seen=i + 1,
                          clipped_count=i + 1, skipped_count=0))
        if draw(st.booleans()):
            log.append(record("layers", step=i, names=names, grad_norm=[1.0] * len(names), param_norm=None,
                              update_ratio=[0.1] * len(names)))
    log += [record("health", step=0, layer=names[0], flag="vanishing", value=1e-9, message="m"),
            record("event", step=0, skipped=True, reason="r", diagnosis=None, text="t"),
            record("end", steps_seen=9, clipped_count=3, skipped_count=1)]
    for _ in range(draw(st.integers(0, 4))):  # overwrite fields with arbitrary JSON values
        rec = log[draw(st.integers(0, len(log) - 1))]
        rec[draw(st.sampled_from(sorted(rec)))] = draw(_VALUES)
    return "".join(json.dumps(r) + "\n" for r in log)  # json.dumps may write NaN/Infinity: the loader refuses them


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_fuzzed_log())
def test_fuzz_only_report_error_escapes_and_every_loaded_log_renders(tmp_path_factory, text):
    d = tmp_path_factory.mktemp("fz") / "run"
    d.mkdir()
    (d / JSONL_NAME).write_text(text)
    try:
        run = load_run(d)
    except ReportError:
        return
    doc, images = render([run], "fuzz")  # accepted by the loader: must draw, with no error of any kind
    assert doc.count("<img ") == len(images) and "<script" not in doc


def test_image_folder_named_after_the_report_and_embedded_only_mode(tmp_path):
    meta = _meta()
    resumed = {**meta, "resumed": True}
    steps = _steps_log([1.0, 2.0, 3.0], [False, True, True])[1:]
    run_dir = _write(tmp_path / "r", [meta, steps[0], steps[1], resumed, steps[1], steps[2]])
    out = tmp_path / "site" / "weekly.html"
    first = build_report(run_dir, out)
    assert sorted(p.relative_to(out.parent).as_posix() for p in first.images) == ["weekly_files/training.png"]
    (out.parent / "weekly_files" / "old-layers.png").write_bytes(b"stale")  # left by an earlier report
    (out.parent / "notes.png").write_bytes(b"mine")  # not the report's: kept
    build_report(run_dir, out)
    assert sorted(p.name for p in (out.parent / "weekly_files").iterdir()) == ["training.png"]
    assert (out.parent / "notes.png").read_bytes() == b"mine"
    html = out.read_text()
    assert "resumed (line 4" in html and 'data-file="weekly_files/training.png"' in html
    only = build_report(run_dir, tmp_path / "mail" / "one.html", write_images=False)
    assert only.images == () and [p.name for p in (tmp_path / "mail").iterdir()] == ["one.html"]
    assert len(_images(only.html.read_text())) == 1
    with pytest.raises(TypeError, match="write_images must be True or False"):
        build_report(run_dir, tmp_path / "x.html", write_images="no")


def test_every_bad_step_appears_even_beyond_the_listed_ones(tmp_path):
    from gradguard.report import _events_html

    norms = [1.0] * 100
    for i in [*range(10, 40), 50, 52, 53, 99]:
        norms[i] = math.nan
    run = load_run(_write(tmp_path / "r", _steps_log(norms, [False] * 100)))
    events = _events_html(run, limit=5)
    assert events.count("<p class=bad>step ") == 5  # 10..14 in full
    assert "<p class=bad>and 29 more at step(s) 15\u201339, 50, 52\u201353, 99</p>" in events
    assert "<p class=bad>34 skipped or non-finite step(s)" in events
