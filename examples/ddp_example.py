"""DDP on two CPU processes (gloo): ``gg.Guard`` keeps the ranks in step when only one of them sees a NaN.

Rank 1's loss is NaN at step 3 (its gradients stay finite, so DDP's all-reduce does not spread it). Without an
agreement rank 1 would skip and rank 0 would step, and the replicas would drift apart. The Guard MAX-reduces its
skip decision, so both skip; ZClip sees the same (all-reduced) gradients on both ranks and its statistics agree.

    python examples/ddp_example.py [--steps 8]

Or with torchrun (the script detects the environment it sets): ``torchrun --nproc-per-node 2 examples/ddp_example.py``
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import gradguard as gg


def train(rank: int, world: int, steps: int) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = DDP(nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1)))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        guard = gg.Guard(model, optimizer, clipper=gg.ZClip(warmup_steps=3))
        for step in range(steps):
            torch.manual_seed(1000 * step + rank)  # each rank its own data
            x, y = torch.randn(16, 8), torch.randn(16, 1)

            def closure(x: torch.Tensor = x, y: torch.Tensor = y, step: int = step) -> torch.Tensor:
                loss = nn.functional.mse_loss(model(x), y)
                return loss + float("nan") if (step == 3 and rank == 1) else loss

            report = guard.step(closure)
            if rank == 0:
                print(f"step {step}: skipped={report.skipped} reason={report.reason}", flush=True)
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        if rank == 0:
            same = all(torch.equal(gathered[0], g) for g in gathered)
            print(f"skipped {guard.skipped_steps} step(s) on every rank; parameters identical across ranks: {same}")
    finally:
        dist.destroy_process_group()


def _spawned(rank: int, world: int, steps: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    train(rank, world, steps)
    # train() destroyed its process group. Leave without interpreter finalization: gloo's worker threads can still
    # hold tensors then, and destroying them aborts the process after the work succeeded (a torch.distributed
    # teardown race).
    sys.stdout.flush()
    os._exit(0)


def main(steps: int) -> None:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        train(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), steps)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(2, steps, port), nprocs=2, join=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    main(parser.parse_args().steps)
