"""Norms never overflow for finite gradients: any finite values up to the dtype maximum give a finite, accurate norm."""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import threading

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradguard as gg
import gradguard.norms as N

FP32_MAX = torch.finfo(torch.float32).max


def _exact(ts, p):
    flat = torch.cat([t.double().reshape(-1) for t in ts])
    return float(torch.linalg.vector_norm(flat, p))


def test_fp32_3e19_is_3e19_not_inf():
    t = torch.tensor([3e19])
    assert float(torch.dot(t, t)) == math.inf  # the fast kernel's sum of squares overflows
    assert float(gg.get_total_norm([t])) == pytest.approx(3e19, rel=1e-6)
    assert float(torch.nn.utils.get_total_norm([t])) == pytest.approx(3e19, rel=1e-6)  # torch agrees


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [3, 1000, 70_000, 300_000])  # concatenated small tensors, one-by-one and chunked upcasts
def test_large_finite_gradients_give_a_finite_accurate_norm(dtype, n):
    big = 2e19 if dtype != torch.float16 else 6e4
    g = (torch.randn(n, dtype=torch.float64).clamp(-3, 3) * big / 3).to(dtype)
    ts = [g, torch.ones(5, dtype=dtype)]
    ours = gg.get_total_norm(ts)
    assert math.isfinite(float(ours))
    assert float(ours) == pytest.approx(_exact(ts, 2), rel=1e-6)
    per = N.tensor_norms(ts)
    assert float(per[0]) == pytest.approx(_exact([g], 2), rel=1e-6)


def test_bf16_2e19_clips_instead_of_skipping():
    params = [torch.zeros(1000, dtype=torch.bfloat16, requires_grad=True)]
    params[0].grad = torch.full((1000,), 2e19, dtype=torch.bfloat16)
    value = float(params[0].grad[0])
    total = gg.clip_grad_norm_(params, 1.0)
    assert float(total) == pytest.approx(value * math.sqrt(1000), rel=1e-6)
    assert float(gg.get_total_norm([params[0].grad])) == pytest.approx(1.0, rel=1e-2)  # really clipped


def test_up_to_the_dtype_maximum():
    # nine values of 1e38: norm 3e38 < fp32 max; every square overflows fp32
    ts = [torch.full((9,), 1e38)]
    assert float(gg.get_total_norm(ts)) == pytest.approx(3e38, rel=1e-6)
    ts = [torch.tensor([FP32_MAX]), torch.zeros(3)]
    assert float(gg.get_total_norm(ts)) == pytest.approx(float(FP32_MAX), rel=1e-6)
    assert float(gg.get_total_norm(ts, 3.0)) == pytest.approx(float(FP32_MAX), rel=1e-6)
    # float64 overflows its own accumulation above 1e154
    d = [torch.tensor([1e200, 1e200], dtype=torch.float64)]
    assert float(gg.get_total_norm(d)) == pytest.approx(math.sqrt(2) * 1e200, rel=1e-12)
    # a true norm above the dtype maximum is inf, as it must be
    assert float(gg.get_total_norm([torch.full((4,), 3e38)])) == math.inf


def test_combining_norms_does_not_overflow():
    assert float(N.combine_norms(torch.tensor([3e19, 4e19]), 2.0)) == pytest.approx(5e19, rel=1e-6)
    assert float(N.combine_norms(torch.tensor([3e30, 4e30]), 1.5)) == pytest.approx(
        (3e30**1.5 + 4e30**1.5) ** (1 / 1.5), rel=1e-6
    )
    assert float(N.combine_norms(torch.tensor([0.0, 0.0]), 2.0)) == 0.0
    assert math.isnan(float(N.combine_norms(torch.tensor([1.0, math.nan]), 2.0)))
    assert float(N.combine_norms(torch.tensor([1.0, math.inf]), 2.0)) == math.inf


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_nonfinite_gradients_still_give_nonfinite_norms(bad):
    ts = [torch.tensor([3e19, bad]), torch.ones(70_000)]
    total = float(gg.get_total_norm(ts))
    assert math.isnan(total) if math.isnan(bad) else total == math.inf
    assert not math.isfinite(float(N.tensor_norms(ts)[0]))


@given(
    exponent=st.integers(-30, 37),
    sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=6),
    p=st.sampled_from([1.0, 2.0, 3.0, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_finite_inputs_any_magnitude_match_float64(exponent, sizes, p, seed):
    g = torch.Generator().manual_seed(seed)
    ts = [(torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1).mul(10.0**exponent).float() for n in sizes]
    exact = _exact(ts, p)
    ours = float(gg.get_total_norm(ts, p))
    rel = 1e-6 if p == 2 else 1e-5  # torch's own fp32 vector_norm for p != 2 is off by ~1e-6 at 3000 values
    if exact < float(FP32_MAX) * (1 - 1e-5):
        assert ours == pytest.approx(exact, rel=rel, abs=0)
    per = N.tensor_norms(ts, p)
    for t, n in zip(ts, per.tolist()):
        e = _exact([t], p)
        if e < float(FP32_MAX) * (1 - 1e-5):
            assert n == pytest.approx(e, rel=rel, abs=0)


@pytest.mark.parametrize("n", [10, 70_000])
def test_tiny_gradients_do_not_underflow(n):
    # squares of 1e-25 are 0 in float32: the fast sum of squares is 0; the norm must still be accurate
    ts = [torch.full((n,), 1e-25), torch.full((3,), -2e-25)]
    assert float(gg.get_total_norm(ts)) == pytest.approx(_exact(ts, 2), rel=1e-6)
    assert N.tensor_norms(ts).tolist() == pytest.approx([_exact(ts[:1], 2), _exact(ts[1:], 2)], rel=1e-6)
    b = [torch.full((n,), 1e-25, dtype=torch.bfloat16)]
    assert float(gg.get_total_norm(b)) == pytest.approx(_exact(b, 2), rel=1e-6)
    assert float(gg.get_total_norm([torch.zeros(n), torch.zeros(3)])) == 0.0


def _bf16_rows_rel(n):
    """The bf16 total's documented accuracy on n values: each 1024-value row norm is rounded to bf16 (relative
    error <= 2^-8, independent across rows), so the total is off by about 1.6e-3 / sqrt(rows); 1e-2 / sqrt(rows) is
    six standard deviations."""
    return 1e-2 / math.sqrt(n // 1024)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("offset", "rel"), [(0.0, 2e-6), (50.0, 5e-6)])
def test_long_tensors_are_accurate_where_torchs_kernel_is_not(dtype, offset, rel):
    # torch's CPU fp32 norm kernel loses precision on long vectors (1e-4 here); the engine reduces rows of 1024 values
    # and combines them in float64: within 1e-7 of float64 for fp32, also with a large common offset
    torch.manual_seed(0)
    g = (torch.randn(1 << 22, dtype=torch.float64) * 3e3 + offset).to(dtype)
    ts = [g.view(1024, -1), torch.randn(300, dtype=torch.float64).to(dtype)]
    exact = _exact(ts, 2)
    total_rel = rel if dtype == torch.float32 else _bf16_rows_rel(g.numel())  # bf16 total: rows rounded to bf16
    assert float(gg.get_total_norm(ts)) == pytest.approx(exact, rel=total_rel)
    assert float(N.tensor_norms(ts)[0]) == pytest.approx(_exact(ts[:1], 2), rel=rel)  # per tensor: exact upcast
    torch_err = abs(float(torch.linalg.vector_norm(g)) - _exact([g], 2)) / _exact([g], 2)
    assert torch_err > 10 * (rel if dtype == torch.float32 else abs(float(gg.get_total_norm(ts)) / exact - 1))


def _row_kernel_inputs(dtype):
    torch.manual_seed(1)
    shapes = [(3000, 700), (50, 4000), (70_000,), (768,), (5,), (0,), (2_500_001,), (9000,), (128, 129)]
    return [(torch.randn(s, dtype=torch.float64) * 10 + 3).to(dtype) for s in shapes]


@pytest.mark.parametrize("on_device_path", [False, True], ids=["host-path", "device-path"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_row_kernel_agrees_with_float64(on_device_path, dtype):
    # Both ways the CPU engine runs the row kernel (with host reads; inside device_path, as fused_clip_step does),
    # on tensors with and without tails (numel not a multiple of 1024), small ones and an empty one.
    ts = _row_kernel_inputs(dtype)
    exact = _exact(ts, 2)
    rel = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: _bf16_rows_rel(sum(t.numel() for t in ts))}
    if on_device_path:
        with N.device_path():
            total = gg.get_total_norm(ts)
    else:
        total = gg.get_total_norm(ts)
    assert total.dtype == N.accumulation_dtype(dtype)
    assert float(total) == pytest.approx(exact, rel=rel[dtype])
    if not on_device_path:
        per = N.tensor_norms(ts).tolist()
        assert per == pytest.approx([_exact([t], 2) for t in ts], rel=2e-6 if dtype != torch.float64 else 1e-12)
        for p in (1.0, math.inf, 3.0):
            assert float(gg.get_total_norm(ts, p)) == pytest.approx(_exact(ts, p), rel=1e-5)
        big = [torch.full((200_000,), 3e19, dtype=dtype)]  # every row's sum of squares overflows: the rescue
        if dtype != torch.float64:
            assert float(gg.get_total_norm(big)) == pytest.approx(float(big[0][0]) * math.sqrt(200_000), rel=1e-6)


def test_fp32_rows_stay_accurate_on_constant_data():
    # Constant data is the worst case of a sequential sum (every rounding error has the same sign): torch's kernel on
    # 16K-value views is off by 9e-6 here, rows of 1024 by <= 4e-7 each, and the float64 combine adds nothing.
    ts = [torch.full((2_500_000,), 0.1), torch.full((100_000,), -0.3), torch.full((1 << 20,), 7.0)]
    exact = _exact(ts, 2)
    assert float(gg.get_total_norm(ts)) == pytest.approx(exact, rel=1e-6)
    with N.device_path():
        assert float(gg.get_total_norm(ts)) == pytest.approx(exact, rel=1e-6)
    torch_views = float(torch.stack(torch._foreach_norm(list(ts[0].split(1 << 14)))).norm())
    assert abs(torch_views / _exact(ts[:1], 2) - 1) > 2e-6  # the old 16K-view kernel would fail this test


def test_bf16_total_error_is_within_its_documented_bound_and_below_torchs():
    # One row holding almost all of the norm is the worst case for the bf16 rows (nothing averages): still within
    # 2^-8 (the rounding of one bf16 value, the gradients' own resolution); many equal rows average the errors out.
    g = torch.randn(1 << 20, dtype=torch.float64)
    g[:1024] *= 1e3
    worst = [g.to(torch.bfloat16)]
    assert float(gg.get_total_norm(worst)) == pytest.approx(_exact(worst, 2), rel=2**-8)
    torch.manual_seed(2)
    many = [(torch.randn(1 << 24, dtype=torch.float64) * 0.01 + 0.003).to(torch.bfloat16)]
    ours = abs(float(gg.get_total_norm(many)) / _exact(many, 2) - 1)
    theirs = abs(float(torch.nn.utils.get_total_norm(many)) / _exact(many, 2) - 1)
    assert ours <= _bf16_rows_rel(1 << 24)
    assert ours < theirs / 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_gradients_same_bits_whatever_the_thread_count(dtype):
    # Each row is reduced by one thread, whatever the partition, and the combine is a fixed sequence: the result does
    # not depend on how many threads run (nor on the machine's load, which only changes who runs what).
    ts = _row_kernel_inputs(dtype)
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results += [gg.get_total_norm(ts), gg.get_total_norm(ts)]
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(r, results[0]) for r in results)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_path_combines_tensor_and_row_norms_without_overflow(dtype):
    # Norms below 1.8e19 whose squares sum past the float32 maximum (1.5e19 and 1.5e19: 4.5e38) combine to a finite
    # total, in float64, for small tensors and rows alike, with no rescue pass needed.
    ts = [torch.full((1,), 1.5e19, dtype=dtype), torch.full((1,), 1.5e19, dtype=dtype)]
    rows = [torch.full((70_000,), 1.5e19 / math.sqrt(1024), dtype=dtype)]  # each 1024-value row has norm ~1.5e19
    for case in (ts, rows, ts + rows):
        with N.device_path():
            total = float(gg.get_total_norm(case))
        assert total == pytest.approx(_exact(case, 2), rel=1e-2 if dtype == torch.bfloat16 else 1e-6)


@pytest.fixture
def small_tasks(monkeypatch):
    """Tasks of 1M values, so that 11M values are enough for the CPU workers (fewer than _POOL_MIN tasks run
    inline; with the default 4M-value tasks it takes 32M values)."""
    monkeypatch.setattr(N, "_TASK", 1 << 20)


def _big_inputs(dtype):
    torch.manual_seed(3)
    shapes = [(4096, 1024), (2_500_001,), (2048, 2048), (70_000,), (700, 30)]
    return [(torch.randn(s, dtype=torch.float64) * 0.01 + 0.003).to(dtype) for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_workers_give_the_same_bits_as_inline_and_match_float64(dtype, small_tasks):
    ts = _big_inputs(dtype)
    before = torch.get_num_threads()
    try:
        results = {}
        for n in (1, 2, 3):  # 1: inline; 2 and 3: that many single-threaded workers
            torch.set_num_threads(n)
            results[n] = gg.get_total_norm(ts)
            with N.device_path():
                assert torch.equal(gg.get_total_norm(ts), results[n])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[1], results[2]) and torch.equal(results[1], results[3])
    rel = 1e-6 if dtype == torch.float32 else _bf16_rows_rel(sum(t.numel() for t in ts))
    assert float(results[1]) == pytest.approx(_exact(ts, 2), rel=rel)


def test_cpu_workers_run_single_threaded_kernels_and_leave_the_caller_alone():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = N.cpu_map(lambda _: (torch.get_num_threads(), threading.current_thread().name), list(range(N._POOL_MIN)))
        assert {n for n, _ in seen} == {1}  # each worker's own OpenMP setting
        assert all(name.startswith("gradguard-cpu") for _, name in seen)
        assert torch.get_num_threads() == 2  # the calling thread keeps its setting
        few = N.cpu_map(lambda _: threading.current_thread().name, list(range(N._POOL_MIN - 1)))
        assert set(few) == {threading.current_thread().name}  # little work: inline
    finally:
        torch.set_num_threads(before)


_FORK_INPUTS: list[torch.Tensor] = []


def _norm_in_child(queue):
    # Only the workers run kernels here with more than one thread's worth of work: GNU OpenMP itself cannot start a
    # multi-threaded region in a forked child once the parent has used one (a torch limitation, hence the inputs are
    # made in the parent).
    queue.put(float(gg.get_total_norm(_FORK_INPUTS)))


def test_cpu_workers_survive_fork(small_tasks):
    # The parent has started its workers; a forked child has none of their threads and must start its own (without
    # the at-fork reset it would wait forever for the parent's).
    _FORK_INPUTS[:] = _big_inputs(torch.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = float(gg.get_total_norm(_FORK_INPUTS))
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_norm_in_child, args=(queue,))
        child.start()
        child.join(timeout=60)
        if child.exitcode is None:
            child.kill()
        assert child.exitcode == 0
        assert queue.get(timeout=5) == expected
    finally:
        torch.set_num_threads(before)
        _FORK_INPUTS.clear()


def test_big_inputs_are_enough_for_the_workers(small_tasks):
    tasks = N.cpu_tasks(
        r for t in _big_inputs(torch.float32) for r in torch.split(N._row_view(t)[0], N._TASK // N._ROW)
    )
    assert len(tasks) >= N._POOL_MIN


@pytest.mark.skipif(N._WORKERS.omp() is None, reason="needs torch on OpenMP (a per-thread thread count)")
def test_small_tensors_are_reduced_single_threaded_and_the_caller_keeps_its_threads(monkeypatch):
    # The concatenation path (many short kernels on a cache-resident buffer) runs on one OpenMP thread: same bits as
    # with the caller's two threads, and the caller's setting is back afterwards, also after an error inside.
    torch.manual_seed(5)
    ts = [torch.randn(int(n)) for n in torch.randint(16, 2048, (600,))]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        real_partial = N._partial
        monkeypatch.setattr(N, "_partial", lambda v, p: (seen.append(torch.get_num_threads()), real_partial(v, p))[1])
        total = gg.get_total_norm(ts)
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
        seen.clear()
        with monkeypatch.context() as m:
            m.setattr(N, "single_threaded", contextlib.nullcontext)  # the same path on the caller's two threads
            again = gg.get_total_norm(ts)
        assert seen and set(seen) == {2}
        assert torch.equal(total, again)
        assert float(total) == pytest.approx(_exact(ts, 2), rel=1e-6)
        with pytest.raises(ZeroDivisionError), N.single_threaded():
            assert torch.get_num_threads() == 1
            _ = 1 / 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_norms_of_huge_finite_gradients_are_finite_without_a_host_read(dtype):
    # On CUDA the fused _foreach_norm accumulates in float64 when asked for float64 output: 3e19 (fp32, bf16) or
    # 6e4 x 1e6 values (fp16) give a finite, accurate norm in one pass, under sync debug mode "error".
    big = 6e4 if dtype == torch.float16 else 3e19
    ts = [torch.full((1_000_000,), big, dtype=dtype, device="cuda"), torch.ones(10, dtype=dtype, device="cuda")]
    expected = _exact([t.cpu() for t in ts], 2)
    torch.cuda.set_sync_debug_mode("error")
    try:
        total = gg.get_total_norm(ts)
        per = N.tensor_norms(ts)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert total.dtype == torch.float32 and per.dtype == torch.float32
    assert float(total) == pytest.approx(expected, rel=1e-6)
    assert float(per[0]) == pytest.approx(_exact([ts[0].cpu()], 2), rel=1e-6)


def test_float64_accumulation_is_asked_for_on_cuda_only():
    # What the CUDA test above relies on, checked where there is no GPU: the fused kernel is asked for float64
    # output (so it accumulates in float64) on CUDA for 1- and 2-norms of 32-bit and 16-bit gradients, and nowhere
    # else (MPS has no float64; CPU has its own overflow-free path).
    cuda, cpu, mps = torch.device("cuda"), torch.device("cpu"), torch.device("mps")
    assert N._wide(cuda, 2.0, torch.float32) and N._wide(cuda, 1.0, torch.float32)
    assert not N._wide(cuda, math.inf, torch.float32) and not N._wide(cuda, 3.0, torch.float32)
    assert not N._wide(cuda, 2.0, torch.float64)
    assert not N._wide(cpu, 2.0, torch.float32) and not N._wide(mps, 2.0, torch.float32)


def test_float64_norms_from_the_fused_kernel_are_combined_and_returned_as_float32(monkeypatch):
    # The plumbing of the CUDA path, run on CPU: the fused kernel (CPU's own _foreach_norm) asked for float64, empty
    # tensors among them, combined and cast back; per-tensor norms cast back too. No host read (device path).
    monkeypatch.setattr(N, "_wide", lambda device, p, acc: p in (1.0, 2.0) and acc == torch.float32)
    monkeypatch.setattr(N, "use_foreach", lambda device, foreach: True)
    asked = []
    fused = torch._foreach_norm
    monkeypatch.setattr(
        torch, "_foreach_norm", lambda ts, p, dtype=None: (asked.append(dtype), fused(ts, p, dtype=dtype))[1]
    )
    ts = [
        torch.full((1000,), 6e4, dtype=torch.float16),
        torch.zeros(0, dtype=torch.float16),
        torch.full((3,), 1e4, dtype=torch.float16),
    ]
    with N.device_path():
        total = gg.get_total_norm(ts)
        per = N.tensor_norms(ts)
        l1 = gg.get_total_norm(ts, 1)
    assert asked == [torch.float64] * 3
    assert total.dtype == per.dtype == l1.dtype == torch.float32
    assert float(total) == pytest.approx(_exact(ts, 2), rel=1e-6)
    assert float(l1) == pytest.approx(_exact(ts, 1), rel=1e-6)
    assert per.tolist() == pytest.approx([_exact(ts[:1], 2), 0.0, _exact(ts[2:], 2)], rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n_small", [3, 64, 65, 300])
@pytest.mark.parametrize("on_device_path", [False, True])
def test_small_tensors_beside_row_reduced_ones_all_count(dtype, n_small, on_device_path):
    # A few small tensors join the rows' float64 combine (one more call); many go through the concatenation path.
    # Either way each one counts: here a small tensor holds most of the norm.
    gen = torch.Generator().manual_seed(n_small)
    big = [(torch.randn(s, generator=gen, dtype=torch.float64) * 1e-2).to(dtype) for s in ((300, 100), (9000,))]
    small = [
        (torch.randn(int(k), generator=gen, dtype=torch.float64)).to(dtype)
        for k in torch.randint(1, 700, (n_small,), generator=gen)
    ]
    small[n_small // 2][0] = 1e3
    ts = big[:1] + small + big[1:] + [torch.zeros(0, dtype=dtype)]
    if on_device_path:
        with N.device_path():
            got = float(gg.get_total_norm(ts))
    else:
        got = float(gg.get_total_norm(ts))
    rel = 1e-6 if dtype != torch.bfloat16 else _bf16_rows_rel(sum(t.numel() for t in ts))
    assert got == pytest.approx(_exact(ts, 2), rel=rel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [3e19, 1e36, 1e-25])
def test_no_host_read_path_on_cpu_rescues_overflow_and_underflow_without_reading_a_value(dtype, scale):
    # Guard(host_sync=False) on CPU: a 2-norm total that overflowed (values above 1.8e19) or underflowed (below
    # 1e-19) in float32 squares is recomputed from the largest magnitude with device ops; deciding to do so reads no
    # value on the host (counted with the dispatch-level host-read counter), and inf / NaN still come out as such.
    from hostreads import HostReads

    gen = torch.Generator().manual_seed(7)
    ts = [(torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtype) for n in (70_000, 300, 0, 20_000)]
    with N.device_path(), HostReads() as reads:
        total = gg.get_total_norm(ts)
        ok = gg.get_total_norm([torch.randn(70_000, generator=gen)])  # the common case: no rescue
    assert reads.count() == 0, [str(r) for r in reads.reads]
    assert math.isfinite(float(total)) and float(total) == pytest.approx(_exact(ts, 2), rel=1e-6)
    assert math.isfinite(float(ok))
    for bad in (math.inf, math.nan):
        broken = [t.clone() for t in ts]
        broken[3][5] = bad
        with N.device_path():
            got = float(gg.get_total_norm(broken))
        assert math.isnan(got) if math.isnan(bad) else got == math.inf


def test_the_cpu_write_pass_is_one_call_below_the_workers_threshold_and_shared_above(monkeypatch):
    # worth_workers decides: below it the write pass is one _foreach_mul_ over all tensors on the caller's thread;
    # above it, tasks on the workers. The bits are the same either way.
    import gradguard.scaling as S

    monkeypatch.setattr(N, "_TASK", 1 << 14)  # the threshold is then _POOL_MIN x 16K values
    calls = []
    real = torch._foreach_mul_
    monkeypatch.setattr(
        torch, "_foreach_mul_", lambda xs, c: (calls.append((len(xs), threading.current_thread().name)), real(xs, c))[1]
    )
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for count in (N._POOL_MIN - 3, N._POOL_MIN + 2):  # tensors of 20K values: below, then above the threshold
            ts = [torch.randn(20_000, generator=torch.Generator().manual_seed(i)) for i in range(count)]
            want = [t * 0.25 for t in ts]
            calls.clear()
            S._mul_groups(ts, torch.tensor(0.25), None, all_cpu=True)
            assert all(torch.equal(t, w) for t, w in zip(ts, want))
            if not N.worth_workers(count * 20_000):
                assert calls == [(count, threading.current_thread().name)]
            elif N._WORKERS.omp() is not None:
                assert len(calls) == count and sum(n for n, _ in calls) == count  # one task per tensor
                assert any(name.startswith("gradguard-cpu") for _, name in calls)
        assert not N.worth_workers(N._TASK * N._POOL_MIN - 1) and N.worth_workers(N._TASK * N._POOL_MIN)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    "sizes",
    [
        [5000, 3, 0, 40_000, 65_536],  # float32/float64: few tensors, none over _SPLIT -> one _foreach_norm
        [20_000] * 64,  # the 64-tensor case of the benchmarks
        [70_000, 10, 9000, 0, 100],  # one over _SPLIT: rows, the small ones joining
        [9000] + [7] * 64,  # exactly _FEW small ones beside a large one
        [9000] * 100 + [7] * 40,  # many large tensors, few small ones (a Llama's shape)
    ],
)
def test_the_one_pass_common_path_is_taken_and_exact(dtype, sizes):
    # clip_grad_norm_'s usual call (one CPU dtype, few small tensors) is taken in one pass over the tensors, before
    # any grouping. The same tensors give the same bits whether they are the whole call or one dtype group of it.
    gen = torch.Generator().manual_seed(len(sizes))
    ts = [torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) for n in sizes]
    common = N._cpu_common_total(ts)
    assert common is not None and common.dtype == N.accumulation_dtype(dtype)
    assert torch.equal(N.total_norm(ts), common)
    rel = 1e-6 if dtype != torch.bfloat16 else 2**-8  # bf16: each tensor of <= 64K values is one rounded norm
    assert float(common) == pytest.approx(_exact(ts, 2), rel=rel)
    other = torch.full((5,), 2.0, dtype=torch.float16)  # a second dtype: two groups, the same total
    assert float(gg.get_total_norm([*ts, other])) == pytest.approx(math.hypot(float(common), 2.0 * 5**0.5), rel=1e-6)


@pytest.mark.parametrize(
    "ts",
    [
        [torch.ones(9000), torch.ones(10, dtype=torch.float64)],
        [torch.ones(9000, dtype=torch.float16)],
        [torch.ones(9000)] + [torch.ones(3)] * 65,
        [torch.ones(3)] * 65,
        [torch.ones(9000, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16).expand(4000, 3)],
    ],
    ids=["mixed-dtypes", "float16", "many-small", "only-small", "bf16-non-contiguous"],
)
def test_the_common_path_steps_aside_for_the_other_cases(ts):
    # Two dtypes, float16, or more than _FEW small tensors (concatenated by the general path): the common path says
    # None, and the general one gives the exact total.
    if ts[0].dtype == torch.bfloat16:  # a non-contiguous bf16 tensor is still the common case
        assert N._cpu_common_total(ts) is not None
    else:
        assert N._cpu_common_total(ts) is None
    rel = 1e-6 if ts[0].dtype != torch.bfloat16 else 2**-8
    assert float(gg.get_total_norm(ts)) == pytest.approx(_exact(ts, 2), rel=rel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(12))
def test_few_float32_tensors_give_torchs_bits(dtype, seed):
    # Up to 64 float32/float64 tensors of at most 64K values (empty ones too) are reduced as torch reduces them: one
    # _foreach_norm in input order, combined in the same dtype. So the total is torch's, bit for bit.
    gen = torch.Generator().manual_seed(seed)
    sizes = [int(k) for k in torch.randint(0, 9000, (int(torch.randint(1, 65, (1,), generator=gen)),), generator=gen)]
    sizes[::3] = [0 if k % 2 else 100 for k in sizes[::3]]  # empty and short tensors between longer ones
    ts = [torch.randn(n, generator=gen, dtype=dtype) * 10 ** float(torch.randn(1, generator=gen)) for n in sizes]
    assert torch.equal(gg.get_total_norm(ts), torch.nn.utils.get_total_norm(ts))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_common_path_rescues_overflow_and_is_not_taken_without_host_reads(dtype, monkeypatch):
    few = [torch.full((100,), 3e19, dtype=dtype), torch.full((9000,), 3e19, dtype=dtype)]  # squares overflow fp32
    assert N._cpu_common_total(few) is not None
    assert float(gg.get_total_norm(few)) == pytest.approx(_exact(few, 2), rel=1e-6 if dtype == torch.float32 else 1e-2)
    monkeypatch.setattr(N, "_cpu_common_total", lambda ts, p=2.0: pytest.fail("host-read path taken"))
    with N.device_path():  # Guard(host_sync=False) and torch.compile: the no-host-read kernels
        assert float(gg.get_total_norm(few)) == pytest.approx(_exact(few, 2), rel=1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("p", [2.0, 3.5])
def test_where_torchs_own_test_expects_an_overflow_the_norm_is_finite(p):
    # torch's test_clip_grad_norm_error_if_nonfinite expects a float64 gradient of 2e200 to give a non-finite 2-norm
    # and 3.5-norm (its sum of powers overflows float64) and error_if_nonfinite=True to raise. The true norm is
    # finite: gradguard returns it and clips, and the clipped gradients have the norm asked for.
    g = torch.full((10,), 2e200, dtype=torch.float64)
    theirs = torch.ones(10, dtype=torch.float64, requires_grad=True)
    theirs.grad = g.clone()
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_([theirs], 1.0, norm_type=p, error_if_nonfinite=True)
    ours = torch.ones(10, dtype=torch.float64, requires_grad=True)
    ours.grad = g.clone()
    total = gg.clip_grad_norm_([ours], 1.0, norm_type=p, error_if_nonfinite=True)
    assert float(total) == pytest.approx(2e200 * 10 ** (1 / p), rel=1e-12)
    assert float(gg.get_total_norm([ours.grad], p)) == pytest.approx(1.0, rel=1e-12)
