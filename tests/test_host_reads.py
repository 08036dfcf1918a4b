"""Issue 11, zero host syncs: the host-read counter itself, the policy's deferred counters, and the host reads of
``gg.attach`` and the trainer callbacks with ``host_sync=False`` (and the one read per step they cost by default)."""

from __future__ import annotations

import contextlib
import logging
import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradguard as gg
from gradguard.diagnose import Diagnosis
from gradguard.policy import Reason, SkipPolicy, deferred_diagnosis
from hostreads import HostReads

# ------------------------------------------------------------------------------------------- the counter itself


@pytest.mark.parametrize(
    ("what", "read"),
    [
        ("item", lambda t: t.item()),
        ("bool", lambda t: bool(t > 0)),
        ("if", lambda t: 1 if t > 0 else 0),
        ("tolist", lambda t: t.tolist()),
        ("float", lambda t: float(t)),
        ("int", lambda t: int(t)),
        ("equal", lambda t: torch.equal(t, t)),
        ("numpy", lambda t: t.numpy()),
        ("any", lambda t: bool(torch.isnan(t).any())),
    ],
)
def test_the_counter_counts_each_kind_of_host_read_once(what, read):
    t = torch.tensor(1.5)
    with HostReads() as reads:
        read(t)
    assert reads.count() == 1, reads.report()
    assert reads.count(within="gradguard") == 0  # this test's own read, not gradguard's


def test_the_counter_ignores_device_ops_and_restores_tensor_methods():
    tolist = torch.Tensor.tolist
    x = torch.randn(64)
    with HostReads() as reads:
        y = torch.where(torch.isfinite(x), x * 2, torch.zeros_like(x))
        flags = torch.stack([torch.isnan(y).any(), torch.isinf(y).any()])
        z = torch.linalg.vector_norm(y) + flags.float().sum()
        gg.clip_grad_norm_([torch.nn.Parameter(torch.ones(3))], 1.0)  # no gradient: nothing to read
    assert reads.count() == 0, reads.report()
    assert torch.Tensor.tolist is tolist
    assert z.tolist() == pytest.approx(float(torch.linalg.vector_norm(x * 2)), rel=1e-6)  # outside: not counted
    assert reads.count() == 0


def test_the_counter_attributes_reads_to_gradguard_and_counts_device_to_cpu_copies():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    with HostReads() as reads:
        gg.clip_grad_norm_([p], 1.0)  # on CPU, outside device_path(), the engine may read to skip a no-op write
        p.grad.sum().item()
    assert reads.count() >= 1
    assert reads.count() - reads.count(within="gradguard") == 1  # our .item()
    meta = torch.empty(2, device="meta")
    # a non-CPU tensor copied to the CPU: counted when dispatched (meta has no data: torch may refuse the copy)
    with HostReads() as reads, contextlib.suppress(NotImplementedError, RuntimeError):
        meta.to("cpu")
    assert reads.count() == 1, reads.report()


# ------------------------------------------------------------------------------------ deferred policy counters

_R = len(Reason)


def _row(reason: int | None) -> list[bool]:
    return [reason is not None and i == reason for i in range(_R)]


def _eager(policy: SkipPolicy, flags: list[bool]) -> Exception | None:
    policy.start()
    reason = next((r for r, b in zip(Reason, flags) if b), None)
    if reason is None:
        policy.accept()
        return None
    return policy.reject(reason, deferred_diagnosis(reason, policy.steps))


def _counters(policy: SkipPolicy) -> tuple:
    return (policy.state_dict(), policy.last_skipped, policy.last_reason, policy.steps)


@given(
    steps=st.lists(st.tuples(st.lists(st.booleans(), min_size=_R, max_size=_R), st.booleans()), max_size=80),
    policy=st.sampled_from(["skip", "warn", "rollback"]),
    limit=st.sampled_from([None, 0, 2, 5]),
    summary_every=st.sampled_from([1, 3, 7, 100]),
)
def test_deferred_counters_equal_eager_accept_reject(steps, policy, limit, summary_every):
    """For any flag sequence (several flags per step included) and any settle points: the same counters, the same
    log records, the same warnings and the same first TrainingDivergedError as accept()/reject() step by step."""
    eager = SkipPolicy(policy, limit, summary_every=summary_every)
    deferred = SkipPolicy(policy, limit, summary_every=summary_every)
    logger = logging.getLogger("gradguard")
    records: dict[str, list[str]] = {"eager": [], "deferred": []}

    class Collect(logging.Handler):
        def __init__(self, key: str) -> None:
            super().__init__()
            self.key = key

        def emit(self, record: logging.LogRecord) -> None:
            records[self.key].append(record.getMessage())

    errors: dict[str, list[str]] = {"eager": [], "deferred": []}
    caught: dict[str, list[str]] = {}
    for key in ("eager", "deferred"):
        handler = Collect(key)
        logger.addHandler(handler)
        try:
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                for i, (flags, settle_here) in enumerate(steps):
                    if key == "eager":
                        error = _eager(eager, flags)
                        if error is not None:
                            errors[key].append(str(error))
                    else:
                        assert deferred.defer(torch.tensor(flags)) == i + 1
                        if settle_here:
                            error = deferred.settle()
                            if error is not None:
                                errors[key].append(str(error))
                if key == "deferred":
                    error = deferred.settle()
                    if error is not None:
                        errors[key].append(str(error))
            caught[key] = [str(x.message) for x in w]
        finally:
            logger.removeHandler(handler)
    assert _counters(deferred) == _counters(eager)
    assert records["deferred"] == records["eager"]
    assert caught["deferred"] == caught["eager"]
    # eager returns an error at every step past the limit; deferred returns the first of each settled batch
    assert set(errors["deferred"]) <= set(errors["eager"])
    assert bool(errors["deferred"]) == bool(errors["eager"])
    if errors["eager"]:
        assert errors["deferred"][0] == errors["eager"][0]


@given(reasons=st.lists(st.one_of(st.none(), st.integers(0, _R - 1)), min_size=1, max_size=40),
       reads=st.sets(st.integers(0, 39)))
def test_a_counter_read_settles_and_keeps_the_error_for_settle(reasons, reads):
    """Reading a counter mid-way settles (then equal to eager); a divergence found by the read is not raised from
    the property but returned by the next explicit settle()."""
    eager, deferred = SkipPolicy("skip", 3, verbose=False), SkipPolicy("skip", 3, verbose=False)
    first_error = None
    for i, reason in enumerate(reasons):
        error = _eager(eager, _row(reason))
        first_error = first_error or (str(error) if error else None)
        deferred.defer(torch.tensor(_row(reason)))
        if i in reads:
            assert deferred.skipped_steps == eager.skipped_steps
            assert deferred.consecutive_skips == eager.consecutive_skips
            assert deferred.pending_steps == 0
    assert deferred.last_reason == eager.last_reason
    error = deferred.settle()
    assert (str(error) if error else None) == first_error
    assert deferred.settle() is None  # handed over once


def test_settle_is_one_host_read_and_reading_nothing_pending_is_none():
    policy = SkipPolicy("skip", None, verbose=False)
    with HostReads() as reads:
        for i in range(600):  # more than one 256-step block
            policy.defer(torch.tensor(_row(1 if i % 7 == 3 else None)))
    assert reads.count() == 0, reads.report()
    assert policy.pending_steps == 600
    with HostReads() as reads:
        assert policy.settle() is None
    assert reads.count() == 1, reads.report()
    assert (policy.steps, policy.skipped_steps, policy.good_steps) == (600, 86, 514)
    assert policy.skipped_by_reason["nonfinite_grad"] == 86
    with HostReads() as reads:
        assert policy.settle() is None
        assert policy.skipped_steps == 86
        policy.state_dict()
    assert reads.count() == 0


def test_defer_refuses_bad_flags_and_the_raise_policy_before_counting():
    policy = SkipPolicy("skip")
    for bad, exc in [([True] * _R, TypeError), (torch.zeros(_R), ValueError), (torch.zeros(_R + 1, dtype=torch.bool),
                     ValueError), (torch.zeros(1, _R, dtype=torch.bool), ValueError)]:
        with pytest.raises(exc, match="bad must be"):
            policy.defer(bad)  # type: ignore[arg-type]
    assert policy.steps == 0 and policy.pending_steps == 0
    with pytest.raises(ValueError, match="'raise' cannot be deferred"):
        SkipPolicy("raise").defer(torch.zeros(_R, dtype=torch.bool))


def test_eager_steps_after_deferred_ones_come_in_order_and_load_drops_pending():
    policy = SkipPolicy("skip", None, verbose=False)
    policy.defer(torch.tensor(_row(0)))
    assert policy.start() == 2  # settles step 1 first
    policy.accept()
    assert (policy.skipped_steps, policy.good_steps, policy.last_skipped) == (1, 1, False)
    state = policy.state_dict()
    policy.defer(torch.tensor(_row(4)))
    policy.load_state_dict(state)
    assert policy.pending_steps == 0 and policy.state_dict() == state
    assert isinstance(deferred_diagnosis(Reason.NONFINITE_GRAD, 3), Diagnosis)
    assert deferred_diagnosis(Reason.GRAD_NORM_SPIKE, 3).event == "grad_norm_spike"


# ------------------------------------------------------------------------------------------ gg.attach, 0 reads

_FUSED = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, fused=True),
    "adam-masked": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=False),  # not fused: the masked update
}


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _batches(n: int, nan_at: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = [(torch.randn(8, 6, generator=g) * (4.0 if i % 5 == 0 else 1.0), torch.randn(8, 1, generator=g))
           for i in range(n)]
    if nan_at is not None:
        x, y = out[nan_at][0].clone(), out[nan_at][1]
        x[3, 2] = math.nan
        out.insert(nan_at, (x, y))  # an extra, poisoned batch: the run without it never took that step
    return out


def _train(model, opt, batches) -> None:
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _same(model_a, opt_a, model_b, opt_b) -> None:
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys()
        for name in sa[k]:
            assert torch.equal(torch.as_tensor(sa[k][name]), torch.as_tensor(sb[k][name])), (k, name)


@pytest.mark.parametrize("name", list(_FUSED))
def test_attach_without_host_sync_reads_nothing_and_skips_the_nan_step_on_the_device(name):
    """100 steps with gg.attach(host_sync=False), the 51st poisoned by a NaN input: no host read at all (after the
    first step, which creates the optimizer state: a fused SGD's momentum buffers, a non-fused optimizer's state),
    and weights, optimizer state (step counts included) and the clipper's statistics equal, bit for bit, a run
    that never took that step. The counters are right when read at the end, at the cost of one read."""
    model, ref_model = _net(), _net()
    opt, ref_opt = _FUSED[name](model.parameters()), _FUSED[name](ref_model.parameters())
    clip, ref_clip = gg.ZClip(warmup_steps=5), gg.ZClip(warmup_steps=5)
    handle = gg.attach(opt, clip, model, host_sync=False)
    gg.attach(ref_opt, ref_clip, ref_model, host_sync=False)
    poisoned, clean = _batches(99, nan_at=50), _batches(99)
    # a fused kernel reads nothing; torch's non-fused Adam reads its own CPU step counters (.item()): gradguard's
    # reads are those with a gradguard frame on the stack
    within = None if name in ("adamw", "sgd-momentum") else "gradguard"
    with HostReads() as first:
        _train(model, opt, poisoned[:1])
    assert first.count(within) == (0 if name == "adamw" else 1), first.report()  # documented: the state-creating step
    with HostReads() as reads:
        _train(model, opt, poisoned[1:])
    assert reads.count(within) == 0, reads.report(within)
    assert len(poisoned) == 100 and not torch.isfinite(poisoned[50][0]).all() and handle.gate.policy.pending_steps == 100
    _train(ref_model, ref_opt, clean)
    _same(model, opt, ref_model, ref_opt)
    for k, v in clip.state_dict().items():
        assert torch.equal(torch.as_tensor(v), torch.as_tensor(ref_clip.state_dict()[k])), k
    with HostReads() as reads:
        counts = (handle.gate.steps, handle.skipped_steps, handle.gate.policy.good_steps, handle.last_skipped)
    assert counts == (100, 1, 99, False)
    assert handle.gate.policy.skipped_by_reason["nonfinite_grad"] == 1
    assert reads.count() == 1, reads.report()
    assert all(not hasattr(opt, a) for a in ("found_inf", "grad_scale"))  # put back after every step


def test_attach_default_reads_the_flag_once_per_step():
    """The cost host_sync=False removes: one read per step (on the accelerator path; on CPU outside it the engine's
    shortcuts may add reads that cost no synchronisation there)."""
    model = _net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    gg.attach(opt, gg.NormClip(0.5), model)
    with HostReads() as reads, gg.norms.device_path():
        _train(model, opt, _batches(100))
    assert reads.count() == 100, reads.report()
    assert reads.count(within="gradguard") == 100


def test_attach_without_host_sync_composes_with_a_grad_scaler_driving_a_fused_optimizer():
    """unscale_, then scaler.step(opt) sets its own grad_scale/found_inf and calls opt.step(): the pre-hook folds the
    clip and ORs its flag into the scaler's, the post-hook puts the scaler's attributes back (the scaler deletes
    them). Oracle: gg.fused_clip_step(opt, clip, scaler=scaler), the same decisions taken in one call; overflow and
    NaN steps included. No host read, and the loss scale backs off and grows identically."""
    def setup():
        model = _net()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        return model, opt, torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)

    model, opt, scaler = setup()
    ref, ref_opt, ref_scaler = setup()
    clip, ref_clip = gg.NormClip(0.5), gg.NormClip(0.5)
    gg.attach(opt, clip, model, host_sync=False)
    batches = _batches(30)
    for i in (7, 19):
        batches[i] = (batches[i][0] * (math.inf if i == 7 else math.nan), batches[i][1])

    def backward(net, scl, x, y):
        scl.scale(torch.nn.functional.mse_loss(net(x), y)).backward()

    with HostReads() as reads:
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            backward(model, scaler, x, y)
            scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
    assert reads.count() == 0, reads.report()
    with gg.norms.device_path():
        for x, y in batches:
            ref_opt.zero_grad(set_to_none=True)
            backward(ref, ref_scaler, x, y)
            gg.fused_clip_step(ref_opt, ref_clip, scaler=ref_scaler)
            ref_scaler.update()
    _same(model, opt, ref, ref_opt)
    assert scaler.get_scale() == ref_scaler.get_scale()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert float(opt.state[next(iter(model.parameters()))]["step"]) == 28
    assert all(not hasattr(opt, a) for a in ("found_inf", "grad_scale"))


def test_attach_without_host_sync_raises_divergence_at_settle_and_refuses_what_needs_the_host():
    model = _net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    handle = gg.attach(opt, None, model, host_sync=False, max_consecutive_skips=2, settle_every=4)
    before = [p.detach().clone() for p in model.parameters()]
    bad = [(torch.full((8, 6), math.nan), torch.zeros(8, 1))] * 4
    _train(model, opt, bad)  # 4 bad steps, all skipped on the device; nothing read yet
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(gg.TrainingDivergedError, match="3 bad steps in a row"):
        _train(model, opt, bad[:1])  # the 5th step's pre-hook settles (settle_every=4) first
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    handle.remove()
    for kwargs, exc in [({"on_nonfinite": "raise"}, ValueError), ({"monitor": object()}, (TypeError, ValueError)),
                        ({"settle_every": 0}, ValueError), ({"host_sync": 1}, TypeError)]:
        with pytest.raises(exc):
            gg.attach(opt, None, model, **{"host_sync": False, **kwargs})
    with pytest.raises(ValueError, match="settle_every only applies"):
        gg.attach(opt, None, model, settle_every=10)
    assert not opt._optimizer_step_pre_hooks  # nothing was attached by the refused calls


# -------------------------------------------------------------------------------------------- Lightning

def _lightning_fit(tmp_path, callback, x, y, steps: int, *, every: int = 25, bn: bool = False):
    L = pytest.importorskip("lightning")
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            layers = [torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)]
            self.net = torch.nn.Sequential(*([torch.nn.BatchNorm1d(4)] if bn else []), *layers)

        def training_step(self, batch, batch_idx):
            xb, yb = batch
            return torch.nn.functional.mse_loss(self.net(xb), yb)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.01, fused=True)

    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path), log_every_n_steps=every,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[callback] if callback is not None else [],
    )
    module = Module()
    with HostReads() as reads:
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4))
    return module, reads, trainer


def _regression_data(batches: int, nan_batch: int | None = None):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batches * 4, 4, generator=g), torch.randn(batches * 4, 1, generator=g)
    if nan_batch is not None:  # an extra batch, poisoned: the clean run never sees it
        bad_x = torch.randn(4, 4, generator=g)
        bad_x[1, 2] = math.nan
        x = torch.cat([x[: nan_batch * 4], bad_x, x[nan_batch * 4:]])
        y = torch.cat([y[: nan_batch * 4], torch.zeros(4, 1), y[nan_batch * 4:]])
    return x, y


@pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's advice about dataloader workers
def test_lightning_without_host_sync_reads_once_per_log_interval(tmp_path):
    """100 steps, a NaN batch at step 51, log_every_n_steps=25. gradguard's own host reads: 4, the counters'
    settle at each log step. Lightning adds its conversion of the 5 logged values at each log step (20). Weights
    and AdamW state equal, bit for bit, those of a run without the NaN batch."""
    from gradguard.integrations.lightning import GradGuardCallback

    cb = GradGuardCallback(gg.NormClip(0.5), host_sync=False, verbose=False)
    model, reads, _ = _lightning_fit(tmp_path / "a", cb, *_regression_data(99, nan_batch=50), 100)
    ref_cb = GradGuardCallback(gg.NormClip(0.5), host_sync=False, verbose=False)
    ref, _, _ = _lightning_fit(tmp_path / "b", ref_cb, *_regression_data(99), 99)
    _, baseline, _ = _lightning_fit(tmp_path / "c", None, *_regression_data(100), 100)
    assert reads.count(within="gradguard") == 4, reads.report("gradguard")
    assert reads.count() - baseline.count() == 4 + 5 * 4, reads.report()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert (cb.gate.steps, cb.gate.skipped_steps, cb.gate.policy.good_steps) == (100, 1, 99)
    logged = (tmp_path / "a" / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    assert logged[0].count("gradguard/") == 5 and len(logged) == 1 + 4  # header, then the 4 log steps only


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_default_reads_once_per_step_and_device_mode_restores_batchnorm(tmp_path):
    from gradguard.integrations.lightning import GradGuardCallback

    cb = GradGuardCallback(gg.NormClip(0.5), verbose=False)
    with gg.norms.device_path():  # the accelerator path: on CPU the engine's shortcuts may add free reads
        _, reads, _ = _lightning_fit(tmp_path / "a", cb, *_regression_data(100), 100)
    assert reads.count(within="gradguard") == 100, reads.report("gradguard")
    # BatchNorm running statistics: a skipped step leaves them as a run without that batch, on the device path too
    cb = GradGuardCallback(None, host_sync=False, verbose=False)
    model, _, _ = _lightning_fit(tmp_path / "b", cb, *_regression_data(9, nan_batch=4), 10, every=5, bn=True)
    ref, _, _ = _lightning_fit(tmp_path / "c", GradGuardCallback(None, host_sync=False), *_regression_data(9), 9,
                               every=5, bn=True)
    for a, b in zip(model.buffers(), ref.buffers()):
        assert torch.equal(a, b)
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert cb.gate.skipped_steps == 1


def test_lightning_host_sync_false_refuses_a_grad_scaler_and_a_monitor(tmp_path):
    L = pytest.importorskip("lightning")
    from gradguard.integrations.lightning import GradGuardCallback

    with pytest.raises(ValueError, match="monitor= needs host_sync=True"):
        GradGuardCallback(monitor=gg.Monitor(tmp_path / "m"), host_sync=False)
    with pytest.raises(ValueError, match="on_nonfinite='raise' needs host_sync=True"):
        GradGuardCallback(on_nonfinite="raise", host_sync=False)

    from lightning.pytorch.plugins.precision import MixedPrecision

    scaled = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = L.Trainer(accelerator="cpu", plugins=[scaled], logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="cannot run under a GradScaler"):
        GradGuardCallback(host_sync=False).setup(trainer, None, "fit")
    GradGuardCallback(host_sync=True).setup(trainer, None, "fit")  # the default mode takes it


# ---------------------------------------------------------------------------------------- Hugging Face

def _hf_fit(tmp_path, callback, x, y, steps: int, *, bind: bool = False, logging_steps: int = 25):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Data(Dataset):
        def __len__(self) -> int:
            return len(x)

        def __getitem__(self, i):
            return {"x": x[i], "labels": y[i]}

    class Regressor(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

        def forward(self, x, labels=None):
            out = self.net(x)
            return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}

    model = Regressor()
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps, learning_rate=0.01,
        lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[], use_cpu=True, logging_steps=logging_steps,
        save_strategy="no", disable_tqdm=True, train_sampling_strategy="sequential", seed=0,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    callbacks = [callback] if callback is not None and not bind else []
    trainer = Trainer(model=model, args=args, train_dataset=Data(), callbacks=callbacks, optimizers=(opt, None))
    if bind:
        callback.bind(trainer)
    with HostReads() as reads:
        trainer.train()
    return model, reads, trainer


@pytest.mark.parametrize("bind", [False, True], ids=["unbound", "bound"])
def test_transformers_without_host_sync_reads_twice_per_logging_step(tmp_path, bind):
    """100 steps, logging_steps=25, a NaN batch at step 51: gradguard's own host reads are 8, two per logging step
    (the statistics, and the skip counters). On clean data the Trainer with the callback reads exactly 8 more times
    than without it: the callback adds no read to the Trainer's own (its loss NaN filter, its logs). Weights and
    AdamW state equal, bit for bit, a run that never saw the NaN batch."""
    from gradguard.integrations.transformers import GradGuardCallback

    def make():
        return GradGuardCallback(gg.NormClip(0.5), host_sync=False, verbose=False)

    cb = make()
    model, reads, trainer = _hf_fit(tmp_path / "a", cb, *_regression_data(99, nan_batch=50), 100, bind=bind)
    assert reads.count(within="gradguard") == 8, reads.report("gradguard")
    ref, _, _ = _hf_fit(tmp_path / "b", make(), *_regression_data(99), 99, bind=bind)
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert (cb.gate.steps, cb.gate.skipped_steps) == (100, 1)
    logged = [h for h in trainer.state.log_history if "gradguard/skipped" in h]
    assert [h["gradguard/skipped"] for h in logged] == [0.0, 0.0, 1.0, 0.0]
    assert [h["gradguard/skipped_total"] for h in logged] == [0.0, 0.0, 1.0, 1.0]
    _, with_cb, _ = _hf_fit(tmp_path / "c", make(), *_regression_data(100), 100, bind=bind)
    _, without, _ = _hf_fit(tmp_path / "d", None, *_regression_data(100), 100)
    assert with_cb.count() - without.count() == 8, with_cb.report()


def test_transformers_default_reads_once_per_step_plus_once_per_log(tmp_path):
    from gradguard.integrations.transformers import GradGuardCallback

    cb = GradGuardCallback(gg.NormClip(0.5), verbose=False)
    with gg.norms.device_path():  # the accelerator path: on CPU the engine's shortcuts may add free reads
        _, reads, _ = _hf_fit(tmp_path, cb, *_regression_data(100), 100)
    assert reads.count(within="gradguard") == 100 + 4, reads.report("gradguard")


def test_transformers_host_sync_false_refuses_fp16_and_a_monitor(tmp_path):
    pytest.importorskip("transformers")
    from transformers import TrainingArguments

    from gradguard.integrations.transformers import GradGuardCallback

    with pytest.raises(ValueError, match="monitor= needs host_sync=True"):
        GradGuardCallback(monitor=gg.Monitor(tmp_path / "m"), host_sync=False)
    args = TrainingArguments(output_dir=str(tmp_path), max_grad_norm=0.0, report_to=[], use_cpu=True)
    args.fp16 = True  # set after construction: fp16 on a CPU-only machine is refused by TrainingArguments itself
    with pytest.raises(ValueError, match=r"fp16=True"):
        GradGuardCallback(host_sync=False).on_train_begin(args, None, None)


# ------------------------------------------------------------------------------------------ 2 ranks, gloo

def _two_rank_worker(rank: int, port: int) -> None:
    import torch.distributed as dist

    from test_distributed import _init

    _init(rank, port)
    try:
        model, ref = _net(), _net()  # the same initial weights on both ranks
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
        handle = gg.attach(opt, gg.NormClip(1.0), model, host_sync=False)
        gg.attach(ref_opt, gg.NormClip(1.0), ref, host_sync=False)
        g = torch.Generator().manual_seed(10 + rank)  # different data on each rank, gradients not synchronised
        data = [(torch.randn(8, 6, generator=g), torch.randn(8, 1, generator=g)) for _ in range(6)]
        poisoned = list(data)
        if rank == 1:  # only rank 1's gradients are non-finite at step 3: every rank must skip it
            x = data[2][0].clone()
            x[0, 0] = math.nan
            poisoned[2] = (x, data[2][1])
        with HostReads() as reads:
            _train(model, opt, poisoned)
        assert reads.count() == 0, reads.report()
        _train(ref, ref_opt, data[:2] + data[3:])  # both ranks run the same collectives
        for a, b in zip(model.parameters(), ref.parameters()):
            assert torch.equal(a, b)
        assert (handle.gate.steps, handle.skipped_steps) == (6, 1)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_attach_without_host_sync_skips_on_every_rank_with_no_host_read():
    """2 gloo ranks: one rank's NaN gradients make every rank skip the step, decided by the MAX all-reduce of the
    flag on the device; no host read on either rank."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from test_distributed import _run

    _run(_two_rank_worker)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("trainer", ["lightning", "transformers"])
def test_callbacks_without_host_sync_raise_divergence_at_the_first_log_step(tmp_path, trainer):
    """Every batch NaN, max_consecutive_skips=2, logging every 4 steps: the deferred counters are read at the first
    log step and TrainingDivergedError stops training there."""
    x, y = _regression_data(12)
    x[:] = math.nan
    if trainer == "lightning":
        from gradguard.integrations.lightning import GradGuardCallback

        cb = GradGuardCallback(gg.NormClip(0.5), host_sync=False, max_consecutive_skips=2, verbose=False)
        with pytest.raises(gg.TrainingDivergedError, match="3 bad steps in a row"):
            _lightning_fit(tmp_path, cb, x, y, 12, every=4)
    else:
        from gradguard.integrations.transformers import GradGuardCallback

        cb = GradGuardCallback(gg.NormClip(0.5), host_sync=False, max_consecutive_skips=2, verbose=False)
        with pytest.raises(gg.TrainingDivergedError, match="3 bad steps in a row"):
            _hf_fit(tmp_path, cb, x, y, 12, logging_steps=4)
    # Lightning settles before preparing step 4 (3 pending), the Trainer's on_log after step 4 (4 pending)
    assert cb.gate.steps == (3 if trainer == "lightning" else 4)
    assert cb.gate.skipped_steps == cb.gate.steps
