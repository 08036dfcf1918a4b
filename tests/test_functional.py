"""gradguard's functional core against torch.nn.utils, hand-computed vectors, and its documented differences."""

from __future__ import annotations

import math

import pytest
import torch

import gradguard as gg
from conftest import assert_bit_identical, clone_params, grads_of, make_params

NORM_TYPES = [0.5, 1.0, 2.0, 3.0, math.inf]
SHAPES = [(), (7,), (3, 5), (2, 3, 4, 2), (1,), (40, 30)]
FOREACH = [None, True, False]


def _tol(dtype):
    return {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-14}


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_matches_torch(norm_type, dtype, foreach, max_norm):
    params = make_params(SHAPES, dtype, none_at=(4,))
    ref = clone_params(params)
    ours = gg.clip_grad_norm_(params, max_norm, norm_type=norm_type, foreach=foreach)
    theirs = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type=norm_type, foreach=foreach)
    assert ours.dtype == theirs.dtype == dtype
    torch.testing.assert_close(ours, theirs, **_tol(dtype))
    for p, q in zip(params, ref):
        if q.grad is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, q.grad, **_tol(dtype))


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_empty_tensors_count_as_zero(norm_type):
    params = make_params([(0,), (3, 0), (4,)])
    ref = clone_params(params)
    ours = gg.clip_grad_norm_(params, 0.1, norm_type=norm_type)
    expected = torch.linalg.vector_norm(ref[2].grad, norm_type)
    torch.testing.assert_close(ours, expected)
    if not math.isinf(norm_type):  # torch agrees except for inf, where it raises (difference 2 in the README)
        torch.testing.assert_close(torch.nn.utils.clip_grad_norm_(ref, 0.1, norm_type=norm_type), ours)
    else:
        with pytest.raises(RuntimeError):
            torch.nn.utils.clip_grad_norm_(ref, 0.1, norm_type=norm_type)


def test_generator_and_single_tensor_inputs():
    params = make_params([(3, 4), (5,)])
    ref = clone_params(params)
    ours = gg.clip_grad_norm_((p for p in params), 0.1)
    theirs = torch.nn.utils.clip_grad_norm_((p for p in ref), 0.1)
    torch.testing.assert_close(ours, theirs)
    (single,) = make_params([(6,)])
    (single_ref,) = clone_params([single])
    torch.testing.assert_close(gg.clip_grad_norm_(single, 0.2), torch.nn.utils.clip_grad_norm_(single_ref, 0.2))
    torch.testing.assert_close(single.grad, single_ref.grad)


def test_no_gradients_returns_zero_and_empty_generator_warns():
    params = make_params([(3,), (2,)], grads=False)
    total = gg.clip_grad_norm_(params, 1.0)
    assert torch.equal(total, torch.tensor(0.0))
    assert gg.get_total_norm([]).item() == 0.0
    with pytest.warns(UserWarning, match="empty generator"):
        gg.clip_grad_norm_((p for p in []), 1.0)


def test_seed_000_worked_example():
    x = torch.tensor([102.0, 155.0], requires_grad=True)
    y = torch.tensor([201.0, 221.0], requires_grad=True)
    (x**3 + y**4).sum().backward()
    # dz/dx = 3x^2, dz/dy = 4y^3, total = sqrt(sum of squares), coef = 200 / (total + 1e-6)
    g = torch.cat([3 * torch.tensor([102.0, 155.0], dtype=torch.float64) ** 2, 4 * torch.tensor([201.0, 221.0]).double() ** 3])
    expected_total = g.norm()
    total = gg.clip_grad_norm_([x, y], max_norm=200)
    assert total.item() == pytest.approx(expected_total.item(), rel=1e-6)
    torch.testing.assert_close(x.grad, torch.tensor([0.1155, 0.2668]), atol=1e-4, rtol=0)
    torch.testing.assert_close(y.grad, torch.tensor([120.2386, 159.8205]), atol=1e-3, rtol=0)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_many_small_tensors_and_chunked_large_tensors(norm_type):
    # 3,000 small tensors exercise the batched path, a 600k tensor the chunked path; float64 reference.
    sizes = [int(s) for s in torch.randint(0, 300, (3000,))] + [600_000]
    params = make_params([(s,) for s in sizes])
    ref = torch.linalg.vector_norm(torch.cat([p.grad.double().reshape(-1) for p in params]), norm_type)
    total = gg.get_total_norm([p.grad for p in params], norm_type)
    rel = 1e-4 if norm_type == 3.0 else 2e-5  # fp32 accumulation of |x|^3 over 1e6 values; torch's error is 3e-5
    assert total.item() == pytest.approx(ref.item(), rel=rel)
    per = gg.grad_norms([(f"p{i}", p) for i, p in enumerate(params)], norm_type)
    assert per["total"].item() == pytest.approx(ref.item(), rel=rel)
    for i in (0, 17, 2999, 3000):
        exp = torch.linalg.vector_norm(params[i].grad.double(), norm_type) if params[i].numel() else torch.tensor(0.0)
        assert per[f"p{i}"].item() == pytest.approx(exp.item(), rel=rel, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
def test_reduced_precision_norm_is_accurate_and_never_zeroes(dtype, norm_type):
    # Values near fp16's max: the 2-norm (~1.6e5 .. 1e6) is far above 65504, so fp16 accumulation would be inf.
    shapes = [(300_000,), (1000,), (7, 9)]
    params = make_params(shapes, dtype, scale=3000.0)
    ref_norm = torch.linalg.vector_norm(torch.cat([p.grad.double().reshape(-1) for p in params]), norm_type)
    before = [p.grad.double() for p in params]
    total = gg.clip_grad_norm_(params, max_norm=1.0, norm_type=norm_type)
    assert total.dtype == torch.float32 and torch.isfinite(total)
    assert abs(total.double().item() - ref_norm.item()) / ref_norm.item() <= 1e-3
    coef = 1.0 / (total.item() + 1e-6)
    for p, b in zip(params, before):
        assert p.grad.abs().max() > 0, "gradients were zeroed"
        torch.testing.assert_close(p.grad.double(), b * coef, rtol=1e-2, atol=1e-6)


def test_torch_zeroes_fp16_gradients_that_gradguard_keeps():
    # The defect gradguard fixes: a finite fp16 gradient whose norm exceeds 65504.
    (p,) = make_params([(4,)], torch.float16)
    p.grad = torch.full((4,), 4e4, dtype=torch.float16)  # norm 8e4
    (q,) = clone_params([p])
    assert torch.isinf(torch.nn.utils.clip_grad_norm_([q], 1.0))
    assert torch.all(q.grad == 0)
    total = gg.clip_grad_norm_([p], 1.0)
    assert total.item() == pytest.approx(8e4, rel=1e-3)
    torch.testing.assert_close(p.grad.float(), torch.full((4,), 0.5), rtol=1e-3, atol=0)


def test_mixed_fp16_and_fp32():
    p16 = make_params([(1000,)], torch.float16, scale=100.0)
    p32 = make_params([(50,), (5, 5)], torch.float32, scale=100.0)
    params = p16 + p32
    ref = torch.linalg.vector_norm(torch.cat([p.grad.double().reshape(-1) for p in params]))
    total = gg.clip_grad_norm_(params, 10.0)
    assert total.dtype == torch.float32
    assert total.item() == pytest.approx(ref.item(), rel=1e-3)
    after = torch.linalg.vector_norm(torch.cat([p.grad.double().reshape(-1) for p in params]))
    assert after.item() == pytest.approx(10.0, rel=2e-3)


def test_float64_promotes_total():
    params = make_params([(3,)], torch.float32) + make_params([(4,)], torch.float64)
    assert gg.get_total_norm([p.grad for p in params]).dtype == torch.float64


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_norm_leaves_gradients_untouched(bad):
    params = make_params([(5,), (3, 3)])
    params[0].grad[2] = bad
    before = grads_of(params)
    total = gg.clip_grad_norm_(params, 1.0)
    assert not torch.isfinite(total)
    assert_bit_identical(before, params)  # torch would multiply by NaN / 0 here
    with pytest.raises(RuntimeError, match="error_if_nonfinite=False"):
        gg.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    assert_bit_identical(before, params)
    with pytest.raises(RuntimeError, match="non-finite"):
        gg.get_total_norm([p.grad for p in params], error_if_nonfinite=True)


def test_nan_is_never_spread_by_torch_semantics_check():
    # torch's behaviour, for contrast: one NaN makes every gradient NaN.
    params = make_params([(5,), (3,)])
    params[0].grad[0] = math.nan
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    assert params[1].grad.isnan().all()


def test_cpu_skips_the_write_pass_when_no_clipping_is_needed():
    params = make_params([(100,), (10, 10)])
    versions = [p.grad._version for p in params]
    gg.clip_grad_norm_(params, 1e9)
    assert [p.grad._version for p in params] == versions
    gg.clip_grad_norm_(params, 1e-3)
    assert all(p.grad._version > v for p, v in zip(params, versions))


def test_accelerator_path_never_reads_the_host():
    # Meta tensors have no data: any .item()/bool()/tolist() raises. The non-CPU path must run regardless.
    params = [torch.zeros(s, device="meta", requires_grad=True) for s in [(10,), (3, 4)]]
    for p in params:
        p.grad = torch.empty_like(p)
    total = gg.clip_grad_norm_(params, 1.0)
    assert total.device.type == "meta"
    gg.clip_grads_with_norm_(params, 1.0, total)
    norms = gg.grad_norms([("a", params[0]), ("b", params[1])])
    assert norms["total"].device.type == "meta"
    with pytest.raises(RuntimeError, match="foreach=True"):
        gg.clip_grad_norm_(params, 1.0, foreach=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("foreach", FOREACH)
def test_clip_grad_value_matches_torch(dtype, foreach):
    params = make_params(SHAPES, dtype, scale=3.0, none_at=(1,))
    ref = clone_params(params)
    gg.clip_grad_value_(params, 1.5, foreach=foreach)
    torch.nn.utils.clip_grad_value_(ref, 1.5, foreach=foreach)
    for p, q in zip(params, ref):
        if q.grad is None:
            assert p.grad is None
        else:
            assert torch.equal(p.grad, q.grad)


def test_clip_grad_value_keeps_nan_visible():
    (p,) = make_params([(4,)])
    p.grad = torch.tensor([math.nan, 5.0, -5.0, 0.1])
    gg.clip_grad_value_(p, 1.0)
    assert math.isnan(p.grad[0]) and p.grad[1:].tolist() == pytest.approx([1.0, -1.0, 0.1])


def test_get_total_norm_and_clip_grads_with_norm_compose_like_torch():
    params = make_params([(4, 4), (9,)], scale=5.0)
    ref = clone_params(params)
    total = gg.get_total_norm([p.grad for p in params], 3.0)
    ref_total = torch.nn.utils.get_total_norm([p.grad for p in ref], 3.0)
    torch.testing.assert_close(total, ref_total)
    gg.clip_grads_with_norm_(params, 2.0, total)
    torch.nn.utils.clip_grads_with_norm_(ref, 2.0, ref_total)
    for p, q in zip(params, ref):
        torch.testing.assert_close(p.grad, q.grad)
    gg.clip_grads_with_norm_(params, 1.0, 4.0)  # a float total is accepted: coef 1/4 on a norm of 2
    torch.testing.assert_close(gg.get_total_norm([p.grad for p in params], 3.0), torch.tensor(0.5), rtol=1e-5, atol=0)


def test_grad_norms_per_parameter_and_total():
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1, bias=False))
    model(torch.randn(3, 5)).sum().backward()
    model[0].bias.grad = None
    norms = gg.grad_norms(model)
    assert list(norms) == ["0.weight", "2.weight", "total"]
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(norms[name], torch.linalg.vector_norm(p.grad))
    torch.testing.assert_close(norms["total"], torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
    by_pairs = gg.grad_norms(model.named_parameters(), norm_type="inf")
    assert by_pairs["total"].item() == pytest.approx(max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None))
    assert gg.grad_norms(dict(model.named_parameters()))["total"].item() == pytest.approx(norms["total"].item())
    assert gg.grad_norms(torch.nn.Linear(2, 2)) == {"total": torch.tensor(0.0)}


def test_complex_gradients_norm_like_torch():
    p = torch.zeros(6, dtype=torch.complex64, requires_grad=True)
    p.grad = torch.randn(6, dtype=torch.complex64) * 4
    q = p.detach().clone().requires_grad_(True)
    q.grad = p.grad.clone()
    torch.testing.assert_close(gg.clip_grad_norm_([p], 1.0), torch.nn.utils.clip_grad_norm_([q], 1.0))
    torch.testing.assert_close(p.grad, q.grad)


def test_nn_module_is_accepted_as_its_parameters_across_the_functional_api():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    model(torch.randn(5, 4)).pow(2).sum().mul(50).backward()
    ref = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    for r, p in zip(ref, model.parameters()):
        r.grad = p.grad.clone()
    # clip_grad_norm_: same norm and gradients as torch given the parameter list
    ours = gg.clip_grad_norm_(model, 0.5)
    theirs = torch.nn.utils.clip_grad_norm_(ref, 0.5)
    torch.testing.assert_close(ours, theirs)
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad, r.grad)
    # clip_grad_value_, clip_grads_with_norm_
    gg.clip_grad_value_(model, 0.01)
    torch.nn.utils.clip_grad_value_(ref, 0.01)
    gg.clip_grads_with_norm_(model, 0.005, gg.get_total_norm([p.grad for p in model.parameters()]))
    torch.nn.utils.clip_grads_with_norm_(ref, 0.005, torch.nn.utils.get_total_norm([r.grad for r in ref]))
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad, r.grad)
    # get_total_norm(model): the norm of its parameters, as for model.parameters()
    torch.testing.assert_close(gg.get_total_norm(model), torch.nn.utils.get_total_norm(list(model.parameters())))


def test_nn_module_shared_parameters_count_once():
    lin = torch.nn.Linear(3, 3, bias=False)
    model = torch.nn.Sequential(lin, lin)  # one weight, reached twice
    lin.weight.grad = torch.full((3, 3), 2.0)
    assert float(gg.clip_grad_norm_(model, 1e6)) == pytest.approx(6.0)  # sqrt(9 * 4), not sqrt(18 * 4)
    assert float(gg.get_total_norm(torch.nn.Module())) == 0.0  # no parameters


def _fp32_coefficient(max_norm, total):
    """torch's coefficient in float32: min(max_norm / (total + 1e-6), 1)."""
    return torch.clamp(max_norm / (total.float() + 1e-6), max=1.0)


def test_bf16_gradients_are_scaled_by_the_largest_bf16_factor_not_above_the_coefficient():
    params = make_params([(5000,), (70, 300), (3,)], torch.bfloat16, scale=3.0)
    before = [p.grad.clone() for p in params]
    total = gg.clip_grad_norm_(params, 0.3)
    c = _fp32_coefficient(0.3, total).reshape(1)
    below = c.view(torch.int32).bitwise_and(-65536).view(torch.float32)  # fp32 bits with the low 16 cleared
    factor = below.to(torch.bfloat16)
    assert float(factor) == float(below)  # exactly representable in bf16
    assert float(factor) <= float(c) < float(factor) * (1 + 2**-7)  # the largest bf16 not above c
    for p, b in zip(params, before):
        assert torch.equal(p.grad, b * factor[0])  # bit-identical to multiplying by that bf16 factor
    after = math.sqrt(sum(float(p.grad.double().square().sum()) for p in params))
    assert after <= 0.3 * (1 + 2**-8)  # never above max_norm, up to the rounding of the bf16 elements themselves


def test_mixed_or_fp32_gradients_keep_the_fp32_factor_and_foreach_none_equals_the_loop():
    params = make_params([(5000,), (70, 300)], torch.float32) + make_params([(400,)], torch.bfloat16)
    twin = clone_params(params)
    before = [p.grad.clone() for p in params]
    total = gg.clip_grad_norm_(params, 0.3)  # foreach=None: one _foreach_mul_ for all CPU tensors
    gg.clip_grad_norm_(twin, 0.3, foreach=False)  # a Python loop of mul_
    c = _fp32_coefficient(0.3, total)
    for p, q, b in zip(params, twin, before):
        assert torch.equal(p.grad, b * c)  # the float32 factor, bf16 tensor included (mixed list)
        assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_write_pass_on_the_cpu_workers_equals_the_loop(dtype, monkeypatch):
    # 11M values in tasks of 1M (the default, 4M, takes 32M values to use the workers): the write pass runs as
    # ~1M-value pieces on the single-threaded CPU workers. Bit-identical to the
    # per-tensor loop (foreach=False), including a non-contiguous gradient (scaled whole) and a gradient that itself
    # requires grad (grad mode is per thread: the workers run under no_grad too).
    monkeypatch.setattr(gg.norms, "_TASK", 1 << 20)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        params = make_params([(4096, 1024), (2_500_001,), (2048, 2048), (3000,)], dtype)
        params[2].grad = params[2].grad.t()  # non-contiguous
        params[3].grad.requires_grad_(True)
        twin = clone_params(params)
        twin[2].grad = twin[2].grad.t().contiguous().t()
        before_grads = [p.grad.detach().clone() for p in params]
        total = gg.clip_grad_norm_(params, 0.5)
        gg.clip_grad_norm_(twin, 0.5, foreach=False)
    finally:
        torch.set_num_threads(before)
    for p, q, b in zip(params, twin, before_grads):
        assert torch.equal(p.grad, q.grad)
        assert not torch.equal(p.grad, b)  # really scaled
    assert float(gg.get_total_norm([p.grad for p in params])) == pytest.approx(0.5, rel=1e-2)
    assert float(total) > 0.5


def test_the_functions_run_without_autograd_and_leave_grad_mode_as_it_was():
    # gradguard._nograd.no_grad: gradients off inside (no graph recorded, even for parameters that require grad),
    # grad mode back as it was afterwards, also after an error, and a plain call when it is already off.
    from gradguard._nograd import no_grad

    seen = []

    @no_grad
    def probe(x: torch.Tensor) -> torch.Tensor:
        """Doc."""
        seen.append(torch.is_grad_enabled())
        if x.numel() == 0:
            raise ValueError("empty")
        return x * 2

    w = torch.ones(3, requires_grad=True)
    assert not probe(w).requires_grad and torch.is_grad_enabled()
    with pytest.raises(ValueError):
        probe(torch.zeros(0))
    assert torch.is_grad_enabled()
    with torch.no_grad():
        probe(w)
        assert not torch.is_grad_enabled()
    assert seen == [False, False, False]
    assert probe.__name__ == "probe" and probe.__doc__ == "Doc."

    params = make_params([(3, 4), (5,)])
    total = gg.clip_grad_norm_(params, 1e-3)
    assert not total.requires_grad and torch.is_grad_enabled()
    with pytest.raises(ValueError):
        gg.clip_grad_norm_(params, -1.0)
    assert torch.is_grad_enabled()


def test_the_cpu_write_pass_counts_a_dtensors_local_values(tmp_path, monkeypatch):
    # Whether the write pass goes to the CPU workers depends on the values this rank writes: a DTensor's local shard,
    # not its global size (here a shard of 10 values of an 80-value tensor).
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    import gradguard.scaling as S

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        local = torch.full((10,), 2.0)
        d = DTensor.from_local(local, mesh, [Shard(0)], shape=torch.Size([80]), stride=(1,))
        seen = []
        real = S.worth_workers
        monkeypatch.setattr(S, "worth_workers", lambda n: seen.append(n) or real(n))
        S.clip_to_norm_([d], 1.0, torch.tensor(4.0))
        assert seen == [10]
        torch.testing.assert_close(d.to_local(), torch.full((10,), 2.0 / (4.0 + 1e-6)))
    finally:
        dist.destroy_process_group()
