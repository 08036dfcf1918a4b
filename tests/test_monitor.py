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
from gradguard.runlog import load_run

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
    with pytest.raises(ValueError, match="norm_type"):
        gg.Monitor(target, norm_type=-1.0)
    with pytest.raises(TypeError, match="resume must be a bool"):
        gg.Monitor(target, resume="yes")
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


# ------------------------------------------------------------------------------------- per-layer: one copy at most
def test_per_layer_every_step_update_ratios_from_the_in_place_snapshot(tmp_path):
    # per_layer_every=1: the snapshot of θ_{t-1} is turned into θ_{t-1} - θ_t in place, then refreshed to θ_t
    with gg.Monitor(tmp_path, per_layer_every=1) as monitor:
        model, refs = _train(monitor, steps=6)
        snapshot = monitor._probe._snapshot
        assert snapshot is not None and snapshot[0] == 6  # one snapshot, of the last step's parameters
        for n, p in model.named_parameters():
            assert torch.equal(snapshot[1][n], p.detach()) and snapshot[1][n].data_ptr() != p.data_ptr()
    layers = load_run(tmp_path).layers
    names = [n for n, _ in model.named_parameters()]
    assert [r["step"] for r in layers] == list(range(1, 7))
    assert layers[0]["update_ratio"] is None  # no parameters from the step before the first
    for rec in layers[1:]:
        ref = refs[rec["step"] - 1]
        assert rec["update_ratio"] == pytest.approx([ref["update"][n] for n in names], rel=1e-4)
        assert rec["grad_norm"] == pytest.approx([ref["pre"][n] for n in names], rel=1e-5)


def test_every_step_snapshot_is_refreshed_in_its_own_memory(tmp_path):
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pointers = []
    with gg.Monitor(tmp_path, per_layer_every=1) as monitor:
        for _ in range(5):
            opt.zero_grad()
            model(torch.randn(4, 6)).pow(2).mean().backward()
            opt.step()
            monitor.record(None, loss=1.0, model=model)
            _, snap = monitor._probe._snapshot
            assert all(torch.equal(snap[n], p.detach()) for n, p in model.named_parameters())
            pointers.append({n: t.data_ptr() for n, t in snap.items()})
    params = {p.data_ptr() for p in model.parameters()}
    assert all(ptrs == pointers[0] for ptrs in pointers)  # one allocation, reused: never a second copy
    assert not params & set(pointers[0].values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (exact allocator statistics)")
def test_per_layer_records_hold_at_most_one_copy_of_the_parameters_cuda(tmp_path):
    def peak_extra(per_layer_every, log_dir):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(8)]).cuda()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        x = torch.randn(4, 1024, device="cuda")
        clip = gg.NormClip(1.0)
        with gg.Monitor(log_dir, per_layer_every=per_layer_every) as monitor:
            for step in range(6):
                opt.zero_grad(set_to_none=False)
                model(x).pow(2).mean().backward()
                stats = clip(model)
                opt.step()
                if step == 1:  # from the second step: gradients, and the snapshot taken at step 1, exist
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                monitor.record(stats, loss=1.0, model=model)
            snap = monitor._probe._snapshot
            held = 0 if snap is None else sum(t.numel() * t.element_size() for t in snap[1].values())
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, held, sum(p.numel() * 4 for p in model.parameters())

    off, held_off, param_bytes = peak_extra(None, tmp_path / "off")
    on, held_on, _ = peak_extra(1, tmp_path / "on")
    assert held_off == 0 and held_on == param_bytes  # exactly one copy of the parameters, kept between steps
    assert on - off < param_bytes // 8  # and measuring makes no other copy: less than one layer's bytes on top


def _allocated(fn) -> tuple[int, int]:
    """``(peak, net)`` bytes the CPU allocator handed out while ``fn`` ran, from the profiler's allocation events
    (every allocation, kernel-internal copies included: not only the tensors an op returns)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak, live


def test_the_allocation_meter_sees_kernel_internal_copies():
    t = torch.randn(1 << 20, dtype=torch.bfloat16)  # 2 MiB
    peak, net = _allocated(lambda: torch.empty(1 << 18).fill_(1.0))
    assert (peak, net) == (1 << 20, 0)  # a 1 MiB temporary, freed
    peak, net = _allocated(lambda: torch.linalg.vector_norm(t, dtype=torch.float32))
    assert peak >= 2 * t.numel() * t.element_size() and net == 0  # the float32 copy the old per-layer path made


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("update_ratio", [True, False])
def test_a_per_layer_record_holds_at_most_one_layers_bytes_of_temporaries(tmp_path, dtype, update_ratio):
    # issue 11: per-layer statistics never hold more than one layer's copy at a time. Measured per record(): the
    # allocator's peak above what was live before, kernel-internal copies included. The only thing kept is the
    # update ratio's snapshot of θ_{t-1} (exactly the parameter bytes, taken once, then refreshed in place).
    from gradguard.norms import _STAGE

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Tanh(), nn.Linear(1024, 384), nn.Tanh(), nn.Linear(384, 3)).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    largest = max(p.numel() * p.element_size() for p in model.parameters())  # the first weight: 1M values
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    clip = gg.NormClip(1e-3)
    with gg.Monitor(tmp_path, per_layer_every=1, update_ratio=update_ratio) as monitor:
        for step in range(1, 5):
            opt.zero_grad()
            model(torch.randn(8, 1024, dtype=dtype)).float().pow(2).mean().backward()
            stats = clip(model)
            opt.step()
            peak, net = _allocated(lambda: monitor.record(stats, loss=1.0, model=model))
            kept = param_bytes if update_ratio and step == 1 else 0  # the snapshot, once
            assert kept <= net <= kept + 4096, (step, net)
            assert peak - kept <= largest + 4096, (step, peak, largest)  # before this change: 2x largest (bf16)
            assert peak - kept <= 4 * _STAGE + 16384  # one float32 upcast buffer (1 MiB) and piece norms, at most
    layers = load_run(tmp_path).layers
    assert len(layers) == 4 and (layers[-1]["update_ratio"] is not None) == update_ratio


def test_a_snapshot_for_a_later_measured_step_is_the_only_copy_and_is_freed_after_it(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 64)).to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = 512 * 512 * 2
    seen = []
    with gg.Monitor(tmp_path, per_layer_every=3) as monitor:
        for _ in range(6):
            opt.zero_grad()
            model(torch.randn(4, 512, dtype=torch.bfloat16)).float().pow(2).mean().backward()
            opt.step()
            seen.append(_allocated(lambda: monitor.record(None, loss=1.0, model=model)))
    for step, (peak, net) in enumerate(seen, 1):
        if step % 3 == 2:  # the copy of θ_{t-1}, taken after the step before a measured one
            assert param_bytes <= net <= peak <= param_bytes + 4096
        elif step % 3 == 0:  # measured: the differences are formed in the snapshot, which is then freed
            assert -param_bytes - 4096 <= net <= -param_bytes + 4096 and peak <= largest + 4096
        else:
            assert abs(net) <= 4096 and peak <= 4096


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf, 0.0, -1.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_layer_norms_taken_in_pieces_equal_the_float64_norms(norm_type, dtype):
    # The per-layer path (the engine's per-tensor norms with no host read) against float64, and against torch's
    # kernel taken whole (one float32 copy of each tensor, inaccurate on long ones).
    _CHUNK = gg.norms._SEG

    g = torch.Generator().manual_seed(1)
    ts = [(torch.randn(n, generator=g, dtype=torch.float64) * s).to(dtype)
          for n, s in ((3 * _CHUNK + 5, 1.0), (7, 2.0), (_CHUNK, 1e-2), (0, 1.0), (2 * _CHUNK, 30.0), (1 << 22, 1.0))]
    ts[5] += 1.0  # 4M values with a common offset: torch's float32 kernel, taken whole, is off by ~1e-4 here
    ts[4] = ts[4].view(2, _CHUNK)
    ts[4][1, 7] = 3e3  # one large value: the pieces' norms differ widely
    ts.append(ts[0][: 3 * _CHUNK].view(_CHUNK, 3).t())  # not contiguous: rows of about _CHUNK values
    want = torch.stack([torch.linalg.vector_norm(t.double(), norm_type) if t.numel() else
                        torch.tensor(math.inf if norm_type < 0 else 0.0, dtype=torch.float64) for t in ts])
    with gg.norms.device_path():
        got = gg.norms.tensor_norms(ts, norm_type)
    engine = torch.stack([torch.linalg.vector_norm(t, norm_type, dtype=torch.float32) if t.numel() else
                          torch.tensor(math.inf if norm_type < 0 else 0.0) for t in ts])  # each tensor whole
    assert got.dtype == torch.float32
    if norm_type <= 0:  # these orders do not combine over pieces: taken whole, exactly torch's kernel
        assert torch.equal(got, engine)
    else:
        torch.testing.assert_close(got.double(), want, rtol=3e-5, atol=0)  # float32 accumulation (p = 3: 1.5e-5)
        if norm_type in (1.0, 2.0):
            assert abs(float(got[5]) / float(want[5]) - 1) < 5e-6  # the long tensor, in pieces
            assert abs(float(engine[5]) / float(want[5]) - 1) > 2e-5  # taken whole by torch's kernel: less accurate
        err, engine_err = (got.double() - want).abs(), (engine.double() - want).abs()
        assert bool((err <= engine_err + 2e-6 * want).all()), (err / want, engine_err / want)  # never less accurate


def test_snapshot_is_taken_only_before_measured_steps_and_only_of_trained_parameters(tmp_path):
    model = _mlp()
    model[0].weight.requires_grad_(False)  # frozen: never measured, never copied
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    held = []
    with gg.Monitor(tmp_path, per_layer_every=5) as monitor:
        for _ in range(10):
            opt.zero_grad()
            model(torch.randn(4, 6)).pow(2).mean().backward()
            opt.step()
            monitor.record(None, loss=1.0, model=model)
            snap = monitor._probe._snapshot
            held.append(None if snap is None else (snap[0], sorted(snap[1])))
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert held == [None, None, None, (4, trained), None, None, None, None, (9, trained), None]
    assert all(r["update_ratio"] is not None for r in load_run(tmp_path).layers)


# --------------------------------------------------------------------------------------------- step numbering
def test_steps_count_from_one_and_explicit_steps(tmp_path):
    with gg.Monitor(tmp_path, per_layer_every=None) as monitor:
        monitor.record(None, loss=1.0)
        monitor.record(None, loss=2.0)
        monitor.record(None, loss=3.0, step=10)  # explicit: the automatic numbering continues after it
        monitor.record(None, loss=4.0)
        with pytest.raises(ValueError, match="step must be >= 1"):
            monitor.record(None, loss=5.0, step=0)
        with pytest.raises(TypeError, match="step must be an integer"):
            monitor.record(None, loss=5.0, step="3")
    steps = load_run(tmp_path).steps
    assert [(s["step"], s["loss"], s["steps_seen"]) for s in steps] == [(1, 1.0, 1), (2, 2.0, 2), (10, 3.0, 3),
                                                                        (11, 4.0, 4)]  # failed calls counted nothing


# ------------------------------------------------------------------------------------------------ resume/append
@pytest.mark.parametrize("tail", [1 << 20, 300, 5])  # the whole file; a tail of a few lines; a tail of no line
def test_resume_appends_and_continues_steps_and_counts(tmp_path, monkeypatch, tail):
    monkeypatch.setattr(gg.monitor, "_TAIL", tail)
    with gg.Monitor(tmp_path, per_layer_every=None) as monitor:
        _, first = _train(monitor, steps=5, seed=0)
    before = (tmp_path / "metrics.jsonl").read_text()
    with gg.Monitor(tmp_path, per_layer_every=None, resume=True) as monitor:
        _, second = _train(monitor, steps=4, seed=1)
    text = (tmp_path / "metrics.jsonl").read_text()
    assert text.startswith(before)  # every earlier line kept, byte for byte
    recs = _strict_lines(tmp_path / "metrics.jsonl")
    metas = [r for r in recs if r["type"] == "meta"]
    assert len(metas) == 2 and "resumed" not in metas[0] and metas[1]["resumed"] is True
    steps = [r for r in recs if r["type"] == "step"]
    assert [s["step"] for s in steps] == list(range(1, 10)) and [s["steps_seen"] for s in steps] == list(range(1, 10))
    clips = [r["clipped"] for r in first + second]
    assert [s["clipped_count"] for s in steps] == [sum(clips[: i + 1]) for i in range(9)]
    assert [s["loss"] for s in steps] == pytest.approx([r["loss"] for r in first + second], rel=1e-6)
    run = load_run(tmp_path)
    assert run.end == {"type": "end", "steps_seen": 9, "clipped_count": sum(clips), "skipped_count": 0}


def test_resume_after_sigkill_drops_the_cut_line_and_continues(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _CRASH, str(tmp_path), "kill"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == -9
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"type":"step","step":31,"lo')  # as if killed in the middle of a write
    with gg.Monitor(tmp_path, resume=True) as monitor:  # the dead process's lock does not block the resume
        w = torch.zeros(3, requires_grad=True)
        w.grad = torch.full((3,), 2.0)
        monitor.record(gg.NormClip(1.0)([w]), loss=torch.tensor(7.0))
    recs = _strict_lines(tmp_path / "metrics.jsonl")  # every line strict JSON again: the cut line is gone
    steps = [r for r in recs if r["type"] == "step"]
    assert [s["step"] for s in steps] == list(range(1, 32)) and steps[-1]["loss"] == 7.0
    assert steps[-1]["steps_seen"] == 31 and steps[-1]["clipped_count"] == 29 + 1  # steps 2..30 clipped, then 31
    assert [r["type"] for r in recs].count("meta") == 2 and recs[-1]["type"] == "end"


def test_resume_without_a_run_starts_one_and_resume_keeps_tensorboard_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with gg.Monitor(tmp_path, resume=True, sinks=("jsonl", "tensorboard")) as monitor:  # nothing to resume
        monitor.record(None, loss=1.0)
    assert "resumed" not in _strict_lines(tmp_path / "metrics.jsonl")[0]
    with gg.Monitor(tmp_path, resume=True, sinks=("jsonl", "tensorboard")) as monitor:
        monitor.record(None, loss=2.0)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 2.0)]
    with pytest.raises(ValueError, match="contradict"):
        gg.Monitor(tmp_path, resume=True, overwrite=True)


# ------------------------------------------------------------------------------------------------- one owner
def test_a_second_monitor_on_an_open_log_is_refused(tmp_path):
    first = gg.Monitor(tmp_path)
    first.record(None, loss=1.0)
    for kwargs in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(FileExistsError, match=f"another gg.Monitor \\(pid {os.getpid()}\\)"):
            gg.Monitor(tmp_path, **kwargs)
    first.close()
    assert not (tmp_path / ".gradguard.lock").exists()  # released and removed on close
    with gg.Monitor(tmp_path, resume=True) as again:
        again.record(None, loss=2.0)
    assert [s["step"] for s in load_run(tmp_path).steps] == [1, 2]


def _race_worker(log_dir: str, mode: str, barrier, results) -> None:
    barrier.wait()  # both processes create their Monitor at the same moment
    try:
        monitor = gg.Monitor(log_dir, overwrite=mode == "overwrite", flush_every=1)
    except FileExistsError as e:
        barrier.wait()
        results.put(("refused", str(e)))
        return
    barrier.wait()  # the other one has tried while this one owns the log
    for i in range(20):
        monitor.record(None, loss=float(os.getpid() + i))
    monitor.close()
    results.put(("owner", os.getpid()))


@pytest.mark.parametrize("mode", ["new", "overwrite"])
def test_two_processes_starting_together_never_share_a_log(tmp_path, mode):
    import multiprocessing

    if mode == "overwrite":
        gg.Monitor(tmp_path).close()
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2, timeout=120), ctx.Queue()
    procs = [ctx.Process(target=_race_worker, args=(str(tmp_path), mode, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    outcome = sorted(results.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    (owner, pid), (refused, message) = outcome
    assert (owner, refused) == ("owner", "refused") and "one log has one owner" in message
    recs = _strict_lines(tmp_path / "metrics.jsonl")
    assert [r["type"] for r in recs] == ["meta"] + ["step"] * 20 + ["end"]
    assert [r["loss"] for r in recs[1:-1]] == [float(pid + i) for i in range(20)]  # one process's run, whole


# --------------------------------------------------------------------------------------------- torch.distributed
WORLD = 2


def _dist_worker(rank: int, port: int, log_dir: str, ranks: str) -> None:
    import datetime

    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=30))
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(_mlp())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        monitor = gg.Monitor(log_dir, ranks=ranks, per_layer_every=2)  # every rank creates one, at once
        assert monitor.active == (rank == 0 or ranks == "all")
        guard = gg.Guard(model, opt, clipper=gg.NormClip(1.0), monitor=monitor)
        gen = torch.Generator().manual_seed(rank)
        for _ in range(4):
            x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 1, generator=gen)
            guard.step(lambda x=x, y=y: nn.functional.mse_loss(model(x), y))
        monitor.close()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _dist_exit(rank: int, port: int, log_dir: str, ranks: str) -> None:
    _dist_worker(rank, port, log_dir, ranks)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo teardown race at finalization (see tests/test_distributed.py)


@pytest.mark.parametrize("ranks", ["zero", "all"])
def test_ddp_ranks_each_own_their_log_or_only_rank_zero_writes(tmp_path, ranks):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    mp.spawn(_dist_exit, args=(port, str(tmp_path), ranks), nprocs=WORLD, join=True)
    if ranks == "zero":
        assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
        runs = [load_run(tmp_path)]
    else:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0", "rank1"]
        runs = [load_run(tmp_path / f"rank{r}") for r in range(WORLD)]
    for run in runs:
        assert [s["step"] for s in run.steps] == [1, 2, 3, 4] and run.end["steps_seen"] == 4
        assert [r["step"] for r in run.layers] == [2, 4]
    if ranks == "all":  # DDP: the same (all-reduced) gradient norm on both ranks, each rank's own loss
        assert [s["norm"] for s in runs[0].steps] == pytest.approx([s["norm"] for s in runs[1].steps], rel=1e-6)
        assert [s["loss"] for s in runs[0].steps] != [s["loss"] for s in runs[1].steps]


def test_rank_from_torchrun_environment_before_init(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    quiet = gg.Monitor(tmp_path / "zero")
    quiet.record(None, loss=1.0)
    assert not quiet.closed
    with pytest.raises(ValueError, match="loss must hold one value"):  # arguments are still checked
        quiet.record(None, loss=torch.ones(2))
    quiet.close()
    assert quiet.closed and not quiet.active and not (tmp_path / "zero").exists()  # rank 1, ranks="zero": nothing
    with pytest.raises(RuntimeError, match="closed"):
        quiet.record(None, loss=1.0)
    with gg.Monitor(tmp_path / "all", ranks="all") as mine:
        mine.record(None, loss=1.0)
    assert mine.path == tmp_path / "all" / "rank1" / "metrics.jsonl" and mine.path.is_file()
    with pytest.raises(ValueError, match="ranks must be 'zero'"):
        gg.Monitor(tmp_path, ranks="first")


# -------------------------------------------------------------------------------------------------------- SIGTERM
_TERM = textwrap.dedent("""
    import signal, sys, time, torch, gradguard as gg
    if sys.argv[2] == "chain":
        def previous(signum, frame):
            print("previous handler ran", flush=True)
            sys.exit(3)
        signal.signal(signal.SIGTERM, previous)
    monitor = gg.Monitor(sys.argv[1], flush_every=1000, flush_secs=1e9)
    w = torch.zeros(3, requires_grad=True)
    for i in range(25):
        w.grad = torch.full((3,), float(i))
        monitor.record(gg.NormClip(1.0)([w]), loss=torch.tensor(float(i)))
    print("ready", flush=True)
    time.sleep(600)
""")


@pytest.mark.parametrize("previous", ["default", "chain"])
def test_sigterm_writes_unflushed_steps_then_passes_the_signal_on(tmp_path, previous):
    proc = subprocess.Popen([sys.executable, "-c", _TERM, str(tmp_path), previous], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert len(_strict_lines(tmp_path / "metrics.jsonl")) == 1  # 25 steps staged, none written yet
        proc.send_signal(15)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    if previous == "default":
        assert proc.returncode == -15, err  # still ends by SIGTERM, as without gradguard
    else:
        assert proc.returncode == 3 and "previous handler ran" in out, err
    run = load_run(tmp_path)
    assert [s["step"] for s in run.steps] == list(range(1, 26))
    if previous == "default":
        assert run.end is None  # killed by the signal: no atexit, but every staged step was written first
    else:  # the previous handler exited normally: atexit then closed the monitor
        assert run.end == {"type": "end", "steps_seen": 25, "clipped_count": 24, "skipped_count": 0}
    assert [s["loss"] for s in run.steps] == [float(i) for i in range(25)]


def test_sigterm_handler_is_restored_on_close():
    import signal

    def mine(signum, frame):  # pragma: no cover - never delivered
        pass

    old = signal.signal(signal.SIGTERM, mine)
    try:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            a, b = gg.Monitor(Path(d) / "a"), gg.Monitor(Path(d) / "b")
            assert signal.getsignal(signal.SIGTERM) is not mine
            a.close()
            assert signal.getsignal(signal.SIGTERM) is not mine  # b is still open
            b.close()
            assert signal.getsignal(signal.SIGTERM) is mine
            c = gg.Monitor(Path(d) / "c")
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # someone else's handler after ours: left alone
            c.close()
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, old)


# ---------------------------------------------------------------------------------------------------- sinks
class _ListSink(gg.monitor.Sink):
    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.records: list[dict] = []
        self.opened: Path | None = None
        self.closed = 0

    def open(self, run):
        self.opened = run.path

    def write(self, records):
        self.records.extend(records)

    def close(self):
        self.closed += 1


def test_custom_sink_instances_beside_named_sinks(tmp_path, caplog):
    from gradguard.monitor import JsonlSink, LoggingSink, Sink

    caplog.set_level(logging.INFO, logger="mine")
    a, b = _ListSink("a"), _ListSink("b")  # two instances of one custom class are fine
    mine = logging.getLogger("mine")
    with gg.Monitor(tmp_path, per_layer_every=4, sinks=iter(["jsonl", a, b, LoggingSink(mine)])) as monitor:
        _train(monitor, steps=8)
    assert monitor.sinks == ("jsonl", "_ListSink", "_ListSink", "logging")
    on_disk = _strict_lines(tmp_path / "metrics.jsonl")
    assert a.records == on_disk and b.records == on_disk  # the same records, in the same order
    assert a.opened == tmp_path and a.closed == 1
    assert on_disk[0]["sinks"] == ["jsonl", "_ListSink", "_ListSink", "logging"]
    assert [r.getMessage().split(":")[0] for r in caplog.records if r.name == "mine"] == [
        f"step {i}" for i in range(1, 9)]
    with pytest.raises(ValueError, match="twice"):
        gg.Monitor(tmp_path / "x", sinks=["jsonl", JsonlSink()])
    with pytest.raises(ValueError, match="twice"):
        gg.Monitor(tmp_path / "x", sinks=[a, a])
    with pytest.raises(TypeError, match="gg.Sink instances"):
        gg.Monitor(tmp_path / "x", sinks=[object()])
    with pytest.raises(TypeError, match="logger must be a logging.Logger"):
        LoggingSink("mine")
    assert not (tmp_path / "x").exists()

    class Half(Sink):
        pass

    with pytest.raises(NotImplementedError, match="Half must implement write"):
        gg.Monitor(tmp_path / "y", sinks=Half())
    assert not (tmp_path / "y" / ".gradguard.lock").exists()  # a sink failing at open releases the directory


def test_a_custom_sink_existing_files_refuse_a_new_run(tmp_path):
    class Csv(gg.monitor.Sink):
        def existing(self, log_dir):
            return [p for p in (log_dir / "loss.csv",) if p.exists()]

        def write(self, records):
            pass

    (tmp_path / "loss.csv").write_text("1,2\n")
    with pytest.raises(FileExistsError, match="loss.csv.*resume=True"):
        gg.Monitor(tmp_path, sinks=[Csv()])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.csv"]


def _doc_section(path: Path, heading: str) -> str:
    text = path.read_text()
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:] if end < 0 else text[start:end]


def test_extending_doc_sink_example_runs(tmp_path, monkeypatch):
    import re

    section = _doc_section(Path(__file__).resolve().parents[1] / "docs" / "extending.md", "## A new Monitor sink")
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    for i, code in enumerate(blocks):
        exec(compile(code, f"extending.md[sink {i}]", "exec"), {"__name__": "__doc_example__"})
    rows = (tmp_path / "runs" / "csv-demo" / "steps.csv").read_text().splitlines()
    assert rows[0] == "step,loss,norm,clipped" and [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4", "5"]


def test_a_monitor_dropped_without_close_gives_its_directory_back(tmp_path):
    import gc

    monitor = gg.Monitor(tmp_path)
    del monitor
    gc.collect()
    gg.Monitor(tmp_path, resume=True).close()  # not refused: the collected Monitor's lock was released
    assert not (tmp_path / ".gradguard.lock").exists()


# ---------------------------------------------------------------------------- the integrations number from 1 too
def test_lightning_callback_records_steps_from_one(tmp_path):
    L = pytest.importorskip("lightning")
    from torch.utils.data import DataLoader, TensorDataset

    from gradguard.integrations.lightning import GradGuardCallback

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp()

        def training_step(self, batch, batch_idx):
            return nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(16, 6, generator=g), torch.randn(16, 1, generator=g)), batch_size=4)
    with gg.Monitor(tmp_path / "run", per_layer_every=2) as monitor:
        trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                            callbacks=[GradGuardCallback(gg.NormClip(1.0), monitor=monitor)])
        trainer.fit(Module(), data)
    run = load_run(tmp_path / "run")
    assert [s["step"] for s in run.steps] == [1, 2, 3, 4] and [r["step"] for r in run.layers] == [2, 4]


def test_transformers_callback_records_steps_from_one(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    from gradguard.integrations.transformers import GradGuardCallback

    class Data(Dataset):
        def __len__(self) -> int:
            return 16

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"x": torch.randn(6, generator=g), "labels": torch.randn(1, generator=g)}

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp()

        def forward(self, x, labels=None):
            return {"loss": nn.functional.mse_loss(self.net(x), labels)}

    model = Model()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=4,
                             learning_rate=0.1, lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    with gg.Monitor(tmp_path / "run", per_layer_every=2) as monitor:
        Trainer(model=model, args=args, train_dataset=Data(),
                callbacks=[GradGuardCallback(gg.NormClip(1.0), monitor=monitor)],
                optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None)).train()
    run = load_run(tmp_path / "run")
    assert [s["step"] for s in run.steps] == [1, 2, 3, 4] and [r["step"] for r in run.layers] == [2, 4]


def test_a_forked_child_never_writes_its_parents_log(tmp_path):
    import signal

    monitor = gg.Monitor(tmp_path, flush_every=1000, flush_secs=1e9)
    for i in range(5):
        monitor.record(None, loss=float(i))  # staged, not written
    pid = os.fork()
    if pid == 0:  # the child (like a DataLoader worker) inherited the handler and the open Monitor
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler skips the parent's Monitor, then the default ends it
        finally:
            os._exit(7)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    assert [r["type"] for r in _strict_lines(tmp_path / "metrics.jsonl")] == ["meta"]  # nothing from the child
    assert (tmp_path / ".gradguard.lock").exists()
    monitor.close()
    steps = [r for r in _strict_lines(tmp_path / "metrics.jsonl") if r["type"] == "step"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5]  # written once, by the owner


def test_sigterm_during_a_write_lets_the_write_finish_first(tmp_path):
    import signal

    events: list[str] = []

    class Interrupted(gg.monitor.Sink):
        def write(self, records):
            if any(r["type"] == "step" for r in records) and not events:
                os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler at once: inside this write
                events.append(f"write of {len(records)} records finished")

    old = signal.signal(signal.SIGTERM, lambda signum, frame: events.append("previous handler"))
    try:
        with gg.Monitor(tmp_path, sinks=["jsonl", Interrupted()], flush_every=3) as monitor:
            for i in range(3):
                monitor.record(None, loss=float(i))
        assert events == ["write of 3 records finished", "previous handler"]  # deferred until the write ended
    finally:
        signal.signal(signal.SIGTERM, old)
    assert [r["step"] for r in _strict_lines(tmp_path / "metrics.jsonl") if r["type"] == "step"] == [1, 2, 3]
