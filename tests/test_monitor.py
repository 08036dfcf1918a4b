"""Monitor: JSONL schema, TensorBoard read back, logging, W&B offline, no per-step host sync, crash safety, health."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.monitor import decode_number
from gradguard.report import load_run

STEP_KEYS = {"type", "step", "time", "loss", "norm", "norm_after", "threshold", "coef", "clipped", "skipped",
             "reason", "lr", "steps_seen", "clipped_count", "skipped_count"}


def _strict_lines(path: Path) -> list[dict]:
    """Every line parses as strict JSON (no NaN/Infinity literals)."""
    def bad_constant(name: str) -> float:
        raise AssertionError(f"non-standard JSON constant {name} in {path}")

    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line, parse_constant=bad_constant) for line in text.splitlines()]


def _number(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) or v in ("nan", "inf", "-inf")


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def _train(monitor: gg.Monitor, steps: int = 12, max_norm: float = 1.0, lr: float = 0.1, seed: int = 0):
    """A real training loop recording each step standalone; returns the reference values per step."""
    torch.manual_seed(seed)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    clip = gg.NormClip(max_norm)
    refs = []
    for _ in range(steps):
        x, y = torch.randn(16, 6), torch.randn(16, 1)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        pre = {k: float(v) for k, v in gg.grad_norms(model).items()}  # before clipping
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        stats = clip(model)
        opt.step()
        update = {n: float((p.detach() - before[n]).norm() / p.detach().norm()) for n, p in model.named_parameters()}
        params = {n: float(p.detach().norm()) for n, p in model.named_parameters()}
        refs.append({"loss": float(loss.detach()), "pre": pre, "params": params, "update": update,
                     "clipped": bool(stats.clipped), "coef": float(stats.coef)})
        monitor.record(stats, loss=loss, lr=lr, model=model)
    return model, refs


def test_jsonl_schema_and_values(tmp_path):
    with gg.Monitor(tmp_path / "run", per_layer_every=4, flush_every=5) as monitor:
        model, refs = _train(monitor, steps=12)
    records = _strict_lines(tmp_path / "run" / "metrics.jsonl")
    meta, *rest = records
    assert meta["type"] == "meta" and meta["schema"] == 1 and meta["every"] == 1 and meta["per_layer_every"] == 4
    assert meta["gradguard"] == gg.__version__ and meta["torch"] == torch.__version__
    assert rest[-1] == {"type": "end", "steps_seen": 12, "clipped_count": sum(r["clipped"] for r in refs),
                        "skipped_count": 0}
    steps = [r for r in rest if r["type"] == "step"]
    layers = [r for r in rest if r["type"] == "layers"]
    assert {r["type"] for r in rest} == {"step", "layers", "end"}
    assert [s["step"] for s in steps] == list(range(1, 13))  # step 1 is the first step
    for s, ref in zip(steps, refs):
        assert set(s) == STEP_KEYS
        assert all(_number(s[k]) for k in ("loss", "norm", "norm_after", "threshold", "coef", "lr"))
        assert isinstance(s["clipped"], bool) and s["skipped"] is False and s["reason"] is None
        assert s["loss"] == pytest.approx(ref["loss"], rel=1e-6)
        assert s["norm"] == pytest.approx(ref["pre"]["total"], rel=1e-5)
        assert s["threshold"] == pytest.approx(1.0) and s["lr"] == pytest.approx(0.1)
        assert s["coef"] == pytest.approx(ref["coef"], rel=1e-6) and s["clipped"] == ref["clipped"]
        assert s["norm_after"] == pytest.approx(min(s["norm"], 1.0), rel=1e-5)  # norm * coef
        assert s["clipped_count"] == sum(r["clipped"] for r in refs[: s["step"]])
        assert s["steps_seen"] == s["step"]
    assert any(s["clipped"] for s in steps) and not all(s["clipped"] for s in steps)  # the test sees both cases
    assert [r["step"] for r in layers] == [4, 8, 12]
    names = [n for n, _ in model.named_parameters()]
    for rec in layers:
        ref = refs[rec["step"] - 1]
        assert rec["names"] == names
        assert rec["grad_norm"] == pytest.approx([ref["pre"][n] for n in names], rel=1e-5)  # before clipping
        assert rec["param_norm"] == pytest.approx([ref["params"][n] for n in names], rel=1e-5)
        assert rec["update_ratio"] == pytest.approx([ref["update"][n] for n in names], rel=1e-4)


def test_every_n_keeps_exact_counts(tmp_path):
    with gg.Monitor(tmp_path, every=5, per_layer_every=None) as monitor:
        _, refs = _train(monitor, steps=12)
    steps = [r for r in _strict_lines(tmp_path / "metrics.jsonl") if r["type"] == "step"]
    assert [s["step"] for s in steps] == [5, 10]
    assert steps[-1]["clipped_count"] == sum(r["clipped"] for r in refs[:10])  # steps between records counted


def test_nonfinite_values_loss_only_records_and_events(tmp_path):
    with gg.Monitor(tmp_path) as monitor:
        monitor.record(None, loss=torch.tensor(float("nan")), skipped=True, reason="nonfinite_loss")
        monitor.record(None, loss=2.5)
        w = torch.zeros(2, requires_grad=True)
        w.grad = torch.tensor([float("inf"), 1.0])
        monitor.record(gg.NormClip(1.0)([w]), loss=torch.tensor(1.0), skipped=True, reason="nonfinite_grad")
    recs = _strict_lines(tmp_path / "metrics.jsonl")
    steps = [r for r in recs if r["type"] == "step"]
    events = [r for r in recs if r["type"] == "event"]
    assert steps[0]["loss"] == "nan" and steps[0]["norm"] is None and steps[0]["skipped"] is True
    assert steps[1]["loss"] == 2.5 and steps[1]["skipped_count"] == 1
    assert steps[2]["norm"] == "inf" and steps[2]["coef"] == 1.0  # non-finite gradients are left untouched
    assert [(e["step"], e["reason"], e["diagnosis"]) for e in events] == [(1, "nonfinite_loss", None),
                                                                          (3, "nonfinite_grad", None)]
    assert decode_number(steps[2]["norm"]) == math.inf


def test_inside_the_guard_records_every_step_with_diagnosis(tmp_path):
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = gg.Monitor(tmp_path, per_layer_every=3)
    guard = gg.Guard(model, opt, clipper=gg.NormClip(1.0), monitor=monitor)
    x, y = torch.randn(16, 6), torch.randn(16, 1)
    for i in range(8):
        bad = i == 4
        guard.step(lambda bad=bad: nn.functional.mse_loss(model(x * (math.nan if bad else 1.0)), y))
    monitor.close()
    run = load_run(tmp_path)
    assert [s["step"] for s in run.steps] == list(range(1, 9))  # the Guard's step numbers
    assert [s["skipped"] for s in run.steps] == [False] * 4 + [True] + [False] * 3
    assert run.steps[4]["reason"] == "nonfinite_loss" and run.steps[0]["lr"] == pytest.approx(0.05)
    (event,) = run.events
    assert event["step"] == 5 and event["diagnosis"]["stage"] in ("input", "forward")
    assert "non-finite" in event["text"] and event["text"] == str(guard.diagnosis)
    assert [r["step"] for r in run.layers] == [3, 6]
    assert run.end == {"type": "end", "steps_seen": 8, "clipped_count": run.steps[-1]["clipped_count"],
                       "skipped_count": 1}


_SYNC_METHODS = ("item", "tolist", "__bool__", "cpu", "numpy", "__float__", "__int__", "__index__")


class _SyncCounter:
    """Counts calls to every Tensor method that reads a value back to the host."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in _SYNC_METHODS:
            original = getattr(torch.Tensor, name)

            def wrapper(self_, *args, _name=name, _original=original, **kwargs):
                self.calls.append(_name)
                return _original(self_, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, wrapper)


def test_record_never_reads_device_values_on_the_host(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clip = gg.ZClip(warmup_steps=3)
    batches = [(torch.randn(16, 6), torch.randn(16, 1)) for _ in range(40)]
    monitor = gg.Monitor(tmp_path, per_layer_every=10, flush_every=1000, flush_secs=1e9,
                         sinks=("jsonl", "tensorboard", "logging"))
    prepared = []
    for x, y in batches:  # the training work, done outside the counted region
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        prepared.append((clip(model), loss.detach()))
        opt.step()
    counter = _SyncCounter(monkeypatch)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for stats, loss in prepared:
            monitor.record(stats, loss=loss, lr=torch.tensor(0.1), model=model)
    assert counter.calls == []  # 40 records, 4 with per-layer norms: not one host read
    assert not [e for e in prof.key_averages() if e.key in ("aten::_local_scalar_dense", "aten::item")]
    monitor.flush()
    assert 1 <= len(counter.calls) <= 2  # all 40 steps come back in one transfer (cat(...).cpu().tolist())
    monitor.close()
    assert len([r for r in _strict_lines(tmp_path / "metrics.jsonl") if r["type"] == "step"]) == 40


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_record_does_not_synchronise_a_cuda_device(tmp_path):
    torch.manual_seed(0)
    model = _mlp().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clip = gg.NormClip(1.0)
    monitor = gg.Monitor(tmp_path, per_layer_every=5, flush_every=1000, flush_secs=1e9)
    for step in range(20):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(torch.randn(16, 6, device="cuda")), torch.randn(16, 1, device="cuda"))
        loss.backward()
        stats = clip(model)
        opt.step()
        torch.cuda.set_sync_debug_mode("error")  # any synchronising call inside record raises
        try:
            monitor.record(stats, loss=loss, lr=0.1, model=model, step=step + 1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    monitor.close()
    run = load_run(tmp_path)
    assert len(run.steps) == 20 and [r["step"] for r in run.layers] == [5, 10, 15, 20]


def test_flush_interval_bounds_host_reads(tmp_path, monkeypatch):
    w = torch.zeros(3, requires_grad=True)
    w.grad = torch.ones(3)
    stats = gg.NormClip(1.0)([w])
    monitor = gg.Monitor(tmp_path, flush_every=10, flush_secs=1e9)
    counter = _SyncCounter(monkeypatch)
    for _ in range(35):
        monitor.record(stats, loss=torch.tensor(1.0))
    assert counter.calls.count("tolist") == 3  # steps 10, 20, 30
    monkeypatch.undo()
    monitor.close()


def test_tensorboard_event_files_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with gg.Monitor(tmp_path, per_layer_every=4, sinks=("jsonl", "tensorboard")) as monitor:
        model, refs = _train(monitor, steps=12)
        monitor.record(None, loss=torch.tensor(float("nan")), skipped=True, reason="nonfinite_loss")
    assert list(tmp_path.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("loss", "grad_norm/before_clip", "grad_norm/after_clip", "clip/threshold", "clip/coef",
                "clip/clipped", "clip/skipped", "clip/clip_rate", "lr"):
        assert tag in tags["scalars"], tag
    loss = acc.Scalars("loss")
    assert [e.step for e in loss[:12]] == list(range(1, 13))
    assert [e.value for e in loss[:12]] == pytest.approx([r["loss"] for r in refs], rel=1e-6)
    assert math.isnan(loss[12].value)
    before = acc.Scalars("grad_norm/before_clip")
    assert [e.value for e in before] == pytest.approx([r["pre"]["total"] for r in refs], rel=1e-5)
    assert [e.value for e in acc.Scalars("clip/skipped")] == [0.0] * 12 + [1.0]
    names = [n for n, _ in model.named_parameters()]
    assert f"layer_grad_norm/{names[0]}" in tags["scalars"]
    assert [e.value for e in acc.Scalars(f"layer_grad_norm/{names[0]}")] == pytest.approx(
        [refs[s - 1]["pre"][names[0]] for s in (4, 8, 12)], rel=1e-5)
    assert "layers/log10_grad_norm" in tags["histograms"]
    hist = acc.Histograms("layers/log10_grad_norm")
    assert [h.step for h in hist] == [4, 8, 12] and hist[0].histogram_value.num == len(names)
    assert "events/text_summary" in tags["tensors"]


def test_logging_sink(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gradguard.monitor")
    with gg.Monitor(tmp_path, sinks=("logging",)) as monitor:
        _train(monitor, steps=2)
        monitor.record(None, loss=torch.tensor(float("inf")), skipped=True, reason="nonfinite_loss")
    assert not (tmp_path / "metrics.jsonl").exists()  # only the sinks asked for
    msgs = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "gradguard.monitor"]
    assert msgs[0][0] == logging.INFO and msgs[0][1].startswith("step 1: loss=") and "threshold=1" in msgs[0][1]
    assert (logging.WARNING, "step 3: loss=inf SKIPPED (nonfinite_loss)") in msgs


def test_wandb_offline_sink(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with gg.Monitor(tmp_path, sinks=("jsonl", "wandb"), wandb_kwargs={"project": "gradguard-test"}) as monitor:
        _train(monitor, steps=3)
    (run_file,) = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    # W&B's service process writes the records after finish() returns; wait for them (bounded), then check.
    deadline = time.monotonic() + 60
    data = run_file.read_bytes()
    while b"gradguard/norm_after" not in data and time.monotonic() < deadline:
        time.sleep(0.2)
        data = run_file.read_bytes()
    assert b"gradguard/loss" in data and b"gradguard/norm_after" in data


_CRASH = textwrap.dedent("""
    import os, signal, sys, torch, gradguard as gg
    monitor = gg.Monitor(sys.argv[1], flush_every=10, flush_secs=1e9)
    w = torch.zeros(3, requires_grad=True)
    for i in range(35):
        w.grad = torch.full((3,), float(i))
        monitor.record(gg.NormClip(1.0)([w]), loss=torch.tensor(float(i)))
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError("training crashed")
""")


@pytest.mark.parametrize("how", ["kill", "exception"])
def test_a_crash_leaves_a_readable_jsonl(tmp_path, how):
    proc = subprocess.run([sys.executable, "-c", _CRASH, str(tmp_path), how], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode != 0
    run = load_run(tmp_path)
    if how == "kill":  # SIGKILL: what was flushed survives, whole lines only
        assert [s["step"] for s in run.steps] == list(range(1, 31)) and run.end is None
    else:  # an exception: the interpreter exits through atexit, which closes the monitor
        assert "training crashed" in proc.stderr
        assert [s["step"] for s in run.steps] == list(range(1, 36)) and run.end["steps_seen"] == 35
    assert [s["loss"] for s in run.steps[:3]] == [0.0, 1.0, 2.0]


def test_bad_arguments_raise_before_anything_is_created(tmp_path):
    target = tmp_path / "new"
    with pytest.raises(ValueError, match="unknown sink 'csv'.*jsonl, tensorboard, logging, wandb"):
        gg.Monitor(target, sinks=("jsonl", "csv"))
    with pytest.raises(ValueError, match="at least one sink"):
        gg.Monitor(target, sinks=())
    with pytest.raises(TypeError, match="sink names"):
        gg.Monitor(target, sinks=(1,))
    with pytest.raises(ValueError, match="every must be >= 1"):
        gg.Monitor(target, every=0)
    with pytest.raises(TypeError, match="per_layer_every must be an integer"):
        gg.Monitor(target, per_layer_every=1.5)
    with pytest.raises(TypeError, match="log_dir must be a path"):
        gg.Monitor(3)
    assert not target.exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        gg.Monitor(tmp_path / "file")


def test_existing_run_needs_overwrite(tmp_path):
    gg.Monitor(tmp_path).close()
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        gg.Monitor(tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == before
    with gg.Monitor(tmp_path, overwrite=True, sinks=("jsonl", "tensorboard")) as m:
        m.record(None, loss=1.0)
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1
    with gg.Monitor(tmp_path, overwrite=True, sinks=("jsonl", "tensorboard")) as m:
        m.record(None, loss=1.0)
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1  # the old events file is replaced, not mixed


def test_bad_record_arguments(tmp_path):
    monitor = gg.Monitor(tmp_path)
    with pytest.raises(TypeError, match="stats must be a gg.ClipStats"):
        monitor.record({"norm": 1.0})
    with pytest.raises(ValueError, match="loss must hold one value"):
        monitor.record(None, loss=torch.ones(3))
    with pytest.raises(TypeError, match="skipped must be a bool"):
        monitor.record(None, loss=1.0, skipped=1)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        monitor.record(None, loss=1.0, model="model")
    monitor.close()
    monitor.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        monitor.record(None, loss=1.0)
    assert [r["type"] for r in _strict_lines(tmp_path / "metrics.jsonl")] == ["meta", "end"]


def test_missing_tensorboard_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ImportError, match=r'pip install "gradguard\[tensorboard\]"'):
        gg.Monitor(tmp_path / "x", sinks=("tensorboard",))
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------ layer health
def test_vanishing_layers_are_flagged_in_a_deep_sigmoid_network(tmp_path):
    torch.manual_seed(0)
    layers = []
    for _ in range(16):
        layers += [nn.Linear(32, 32), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gg.Monitor(tmp_path, per_layer_every=2, health=gg.LayerHealth(window=3)) as monitor:
        for _ in range(8):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(torch.randn(32, 32)), torch.randn(32, 1))
            loss.backward()
            opt.step()
            monitor.record(None, loss=loss, model=model)
    run = load_run(tmp_path)
    vanishing = {h["layer"] for h in run.health if h["flag"] == "vanishing"}
    assert "0.weight" in vanishing and "32.weight" not in vanishing  # the first layer, not the head
    assert {h["step"] for h in run.health} == {6}  # raised once, when the window of 3 samples (2, 4, 6) is full
    assert monitor.flags and all(f.flag == "vanishing" for f in monitor.flags)
    assert "clipping cannot help" in run.health[0]["message"]


def test_a_dominant_layer_is_flagged_exploding(tmp_path):
    # tiny weights in front of a LayerNorm: the normalisation divides by their small output, so their gradient is
    # a thousand times larger than anyone else's
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                          nn.Linear(8, 1))
    with torch.no_grad():
        model[0].weight.mul_(1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    with gg.Monitor(tmp_path, per_layer_every=1, health=gg.LayerHealth(window=2)) as monitor:
        for _ in range(3):
            opt.zero_grad()
            loss = model(torch.randn(16, 8)).pow(2).mean()
            loss.backward()
            stats = gg.NormClip(1e9)(model)
            opt.step()
            monitor.record(stats, loss=loss, model=model)
    health = load_run(tmp_path).health
    assert [(h["step"], h["layer"], h["flag"]) for h in health] == [(2, "0.weight", "exploding")]
    assert health[0]["value"] > 0.9 and "gg.LayerwiseClip" in health[0]["message"]


def test_layer_health_rules():
    h = gg.LayerHealth(window=2, vanishing_ratio=1e-3, dominant_share=0.9, min_layers=3)
    names = ["a", "b", "c"]
    assert h.update(1, names, [10.0, 1.0, 1.0], [1.0, 1.0, 1.0]) == []  # window not full yet
    (flag,) = h.update(2, names, [10.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    assert (flag.layer, flag.flag, round(flag.value, 3)) == ("a", "exploding", 0.98)
    assert h.update(3, names, [10.0, 1.0, 1.0], [1.0, 1.0, 1.0]) == []  # still raised: not reported again
    h.update(4, names, [1.0, 1.0, 1.0], [1.0, 1.0, 1.0])  # cleared
    h.update(5, names, [10.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    assert [f.flag for f in h.update(6, names, [10.0, 1.0, 1.0], [1.0, 1.0, 1.0])] == ["exploding"]  # raised again
    assert h.update(7, ["a", "b"], [10.0, 1.0], [1.0, 1.0]) == []  # two layers: one always dominates, no flag
    z = gg.LayerHealth(window=1)
    assert z.update(1, names, [1e-9, 1.0, 1.0], [0.0, 1.0, 1.0]) == []  # zero parameters: no ratio, no flag
    with pytest.raises(ValueError, match="window must be >= 1"):
        gg.LayerHealth(window=0)
    with pytest.raises(ValueError, match="one entry per layer"):
        z.update(1, names, [1.0], [1.0, 1.0, 1.0])


def test_doc_example_runs_in_a_fresh_process(tmp_path):
    code = (
        "import torch, gradguard as gg\n"
        f"m = gg.Monitor({str(tmp_path)!r}, sinks=('jsonl', 'tensorboard'))\n"
        "m.record(None, loss=torch.tensor(1.0))\n"  # never closed: atexit writes it
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env={**os.environ})
    assert [r["type"] for r in _strict_lines(tmp_path / "metrics.jsonl")] == ["meta", "step", "end"]
