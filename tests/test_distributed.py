"""Multi-process tests (2 ranks, gloo, CPU): DDP skip agreement, FSDP2 / DTensor norms, process groups.

Each test spawns two processes with ``torch.multiprocessing``; a gloo timeout and a pytest timeout make a hang fail
fast instead of blocking the suite.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradguard as gg
from gradguard import distributed as D
from gradguard import norms as N

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _init(rank: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=30))


def _exit_worker(rank: int, fn, port: int) -> None:
    """Run ``fn`` in a spawned worker; on success, skip interpreter finalization.

    gloo's worker threads can still hold tensors when the interpreter finalizes, and destroying them then aborts the
    process (SIGABRT, "terminate called without an active exception") after all the work succeeded: a teardown race in
    torch.distributed, not in the code under test. The workers destroy their process group themselves; ``os._exit(0)``
    then leaves without finalization. A failing worker raises as usual, and ``mp.spawn`` reports its traceback.
    """
    fn(rank, port)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run(fn) -> None:
    mp.spawn(_exit_worker, args=(fn, _free_port()), nprocs=WORLD, join=True)


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(out, t.contiguous())
    return out


def _flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


# ------------------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, port: int) -> None:
    _init(rank, port)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # 1. Guard: only rank 1 sees a NaN loss at step 2 (its gradients stay finite): every rank skips it.
        model = DDP(_net())
        opt = torch.optim.AdamW(model.parameters(), lr=0.05)
        guard = gg.Guard(model, opt, clipper=gg.ZClip(warmup_steps=2))
        skipped = []
        for step in range(6):
            torch.manual_seed(100 * step + rank)  # different data on each rank
            x, y = torch.randn(8, 5), torch.randn(8, 3)

            def closure(x=x, y=y, step=step):
                loss = nn.functional.mse_loss(model(x), y)
                return loss + float("nan") if (step == 2 and rank == 1) else loss

            before = _flat_params(model)
            report = guard.step(closure)
            skipped.append(report.skipped)
            if step == 2:
                assert torch.equal(_flat_params(model), before), "the skipped step changed the weights"
        assert skipped == [False, False, True, False, False, False], skipped
        a, b = _gather(_flat_params(model))
        assert torch.equal(a, b), "parameters differ across ranks"
        assert torch.isfinite(a).all()
        for v in guard.clipper.state_dict().values():  # ZClip state identical on every rank
            g0, g1 = _gather(v.float().reshape(-1))
            assert torch.equal(g0, g1)

        # 2. attach: rank 0 gets a NaN input at step 1; DDP spreads it, the reduced flag makes both skip.
        model = DDP(_net())
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        handle = gg.attach(opt, gg.AutoClip(percentile=50), model.module)
        for step in range(4):
            torch.manual_seed(7 * step + rank)
            x, y = torch.randn(8, 5), torch.randn(8, 3)
            if step == 1 and rank == 0:
                x[0, 0] = float("nan")
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            assert handle.last_skipped == (step == 1)
        assert handle.skipped_steps == 1
        a, b = _gather(_flat_params(model))
        assert torch.equal(a, b) and torch.isfinite(a).all()
        history = handle.gate.clipper.state_dict()["history"]  # AutoClip state identical on every rank
        s0, s1 = _gather(history)
        assert torch.equal(s0.nan_to_num(-1), s1.nan_to_num(-1)) and int(torch.isfinite(history).sum()) == 3
        handle.remove()

        # 3. the gate alone, gradients NOT synchronised (no DDP): only rank 1 is non-finite, both skip.
        w = torch.nn.Parameter(torch.ones(3))
        w.grad = torch.tensor([1.0, float("nan") if rank == 1 else 2.0, 3.0])
        gate = gg.hooks.StepGate(gg.NormClip(10.0))
        gate([w], [w])
        assert gate.last_skipped and w.grad is None
        if rank == 0:
            assert gate._diagnosis([]).cause.startswith("another rank")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ddp_every_rank_skips_when_one_rank_sees_nan():
    _run(_ddp_worker)


# -------------------------------------------------------------------------------------------- FSDP2 / DTensor
def _fsdp_worker(rank: int, port: int) -> None:
    _init(rank, port)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (WORLD,))
        torch.manual_seed(1)
        x, y = torch.randn(6, 5), torch.randn(6, 3)  # the same batch on both ranks: FSDP2's mean = the full grad
        ref = _net()
        nn.functional.mse_loss(ref(x), y).backward()
        ref_grads = [p.grad.clone() for p in ref.parameters()]

        sharded = _net()
        fully_shard(sharded, mesh=mesh)
        nn.functional.mse_loss(sharded(x), y).backward()
        grads = [p.grad for p in sharded.parameters()]
        assert all(isinstance(g, DTensor) and g.placements == (Shard(0),) for g in grads)
        # 7 rows over 2 ranks: uneven shards, and the 3-row layer leaves rank 1 a 1-row shard
        for p in (2.0, 1.0, 3.5, float("inf")):
            got, want = N.total_norm(grads, p), N.total_norm(ref_grads, p)
            assert abs(float(got) - float(want)) <= 1e-6 * max(1.0, float(want)), (p, float(got), float(want))
            torch.testing.assert_close(N.tensor_norms(grads, p), N.tensor_norms(ref_grads, p), rtol=1e-6, atol=1e-6)
        ref_total = float(N.total_norm(ref_grads))
        got_total = float(N.total_norm(grads))  # a collective: every rank calls it
        if rank == 0:
            print(f"FSDP2 norm {got_total:.9f} single-process {ref_total:.9f}", flush=True)

        # clipping the sharded gradients in place == clipping the full ones
        stats = gg.NormClip(0.1)(sharded)
        gg.clip_grad_norm_(ref.parameters(), 0.1)
        assert abs(float(stats.norm) - ref_total) <= 1e-6 * max(1.0, ref_total)
        fulls = [p.grad.full_tensor() for p in sharded.parameters()]  # collectives first, then the asserts
        for g, r in zip(fulls, (p.grad for p in ref.parameters())):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)

        # a non-finite shard on one rank only: the reduced norm is non-finite on every rank
        bad = [g.clone() for g in grads]
        if rank == 1:
            bad[0].to_local()[0, 0] = float("nan")
        assert torch.isnan(N.total_norm(bad)) and torch.isnan(N.total_norm(bad, float("inf")))
        assert torch.isnan(N.tensor_norms(bad)[0]) and torch.isfinite(N.tensor_norms(bad)[1:]).all()

        # placements: Replicate is not double counted, Shard(1) is summed, Partial is summed before the norm
        full = torch.arange(12.0).reshape(3, 4) - 5.0
        rep = distribute_tensor(full, mesh, [Replicate()])
        col = distribute_tensor(full, mesh, [Shard(1)])
        part = DTensor.from_local(full * (rank + 1) / 3.0, mesh, [Partial()])  # sums to full
        for t in (rep, col, part):
            torch.testing.assert_close(N.total_norm([t]), torch.linalg.vector_norm(full))
        torch.testing.assert_close(N.total_norm([rep, col, torch.ones(2)]), torch.linalg.vector_norm(
            torch.cat([full.flatten(), full.flatten(), torch.ones(2)])))

        # ZClip on FSDP2: different data on each rank, statistics identical on every rank
        model = _net()
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        zclip = gg.ZClip(warmup_steps=3)
        for step in range(6):
            torch.manual_seed(10 * step + rank)
            opt.zero_grad()
            nn.functional.mse_loss(model(torch.randn(4, 5)), torch.randn(4, 3) * (20 if step == 5 else 1)).backward()
            zclip(model)
            opt.step()
        for k, v in zclip.state_dict().items():
            g0, g1 = _gather(v.float().reshape(-1))
            assert torch.equal(g0, g1), k
        assert bool(zclip.initialized)

        # AGC refuses sharded weights with a clear error, before touching anything
        try:
            gg.AGC()(model)
        except TypeError as e:
            assert "DTensor" in str(e)
        else:
            raise AssertionError("AGC accepted a sharded weight")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_fsdp2_and_dtensor_norms_equal_the_single_process_norm():
    _run(_fsdp_worker)


# ----------------------------------------------------------------------------------------------- process groups
def _group_worker(rank: int, port: int) -> None:
    _init(rank, port)
    try:
        # disjoint gradients per rank (pipeline stages): rank 0 holds [3, 4], rank 1 holds [12] and [0, 0]
        local = [torch.tensor([3.0, 4.0])] if rank == 0 else [torch.tensor([12.0]), torch.zeros(2)]
        world = dist.group.WORLD
        torch.testing.assert_close(N.total_norm(local, process_group=world), torch.tensor(13.0))
        torch.testing.assert_close(N.total_norm(local, float("inf"), process_group=world), torch.tensor(12.0))
        torch.testing.assert_close(N.total_norm(local, 1.0, process_group=world), torch.tensor(19.0))
        torch.testing.assert_close(N.combine_norms(N.tensor_norms(local), 2.0, process_group=world), torch.tensor(13.0))
        # a rank without gradients still takes part
        torch.testing.assert_close(N.total_norm(local if rank == 0 else [], process_group=world), torch.tensor(5.0))

        # a clipper with the group: the same threshold and coefficient on both stages
        params = [torch.nn.Parameter(torch.zeros_like(t)) for t in local]
        for p, t in zip(params, local):
            p.grad = t.clone()
        stats = gg.NormClip(1.0).set_process_group(world)(params)
        c0, c1 = _gather(stats.coef.reshape(1))
        assert torch.equal(c0, c1)
        torch.testing.assert_close(stats.coef, torch.tensor(1.0 / (13.0 + 1e-6)))
        chain = gg.Chain(gg.AdaGC(warmup_steps=1), gg.NormClip(1.0)).set_process_group(world)
        assert all(c.process_group is world for c in chain.clippers)

        # no collective is issued for plain tensors without a group, even with torch.distributed initialised
        calls = []
        real = dist.all_reduce
        dist.all_reduce = lambda *a, **k: calls.append(a) or real(*a, **k)
        try:
            N.total_norm(local)
            N.tensor_norms(local)
            gg.ZClip()(params)
        finally:
            dist.all_reduce = real
        assert calls == []

        # the flag helper: True everywhere when True anywhere
        assert bool(D.any_across_ranks(torch.tensor(rank == 1)))
        assert not bool(D.any_across_ranks(torch.tensor(False)))
        # NaN survives a MAX reduction
        v = torch.tensor([1.0, float("nan") if rank == 0 else 2.0])
        D.all_reduce_norms_(v, float("inf"))
        assert v[0] == 1.0 and torch.isnan(v[1])
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_process_group_reduces_disjoint_gradients():
    _run(_group_worker)


def test_single_process_paths_issue_no_collective(monkeypatch):
    """Not initialised: the helpers are no-ops and never touch torch.distributed's collectives."""
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: pytest.fail("collective issued"))
    t = torch.tensor([3.0, 4.0])
    assert D.all_reduce_norms_(t.clone(), 2.0).tolist() == [3.0, 4.0]
    assert D.all_reduce_sum_(t.clone()).tolist() == [3.0, 4.0]
    assert D.any_across_ranks(torch.tensor(True))
    assert not D.is_dtensor(t) and D.local_tensor(t) is t
    torch.testing.assert_close(N.total_norm([t]), torch.tensor(5.0))
