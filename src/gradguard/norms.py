r"""The norm engine: every gradient norm in gradguard is computed here, once.

For tensors :math:`g_1, \dots, g_n` and :math:`p \in (0, \infty]` the engine gives the per-tensor norms
:math:`\|g_i\|_p` and the total norm

.. math::
    \|g\|_p = \Big\| \big(\|g_1\|_p, \dots, \|g_n\|_p\big) \Big\|_p ,

the norm of all gradients viewed as one vector (the quantity ``torch.nn.utils.clip_grad_norm_`` clips by).

How it is computed:

* tensors are grouped by ``(device, dtype)``; each group is reduced with the fastest kernel for its device;
* accumulation is in float32 (float64 for float64 / complex128 gradients), so finite float16 / bfloat16 gradients
  never overflow to an infinite norm (torch keeps per-tensor norms in the gradient dtype: an fp16 gradient with
  norm 8e4 gives ``inf``);
* on CPU, the 2-norm (the hot path) of float32 / float64 / bfloat16 tensors of 8K values or more: each tensor read
  once as rows of 1024 values by one ``torch.linalg.vector_norm(rows, dim=-1)`` call (torch's own reduction,
  parallel over rows; one fixed kernel whatever the machine's load or thread count, so the same gradients give the
  same bits), the row norms combined in float64. float32: within 1e-6 of float64 (each row a short sum, even on
  constant data). bfloat16 (total only): each row's norm is rounded to bf16 by torch's kernel, which reads bf16
  without a copy (bf16 tensors of 8K-64K values: one rounded norm each, as torch); the errors are independent, so
  the total is within about 1.6e-3 / sqrt(pieces) (2e-6 on GPT-2 small), never more than 2^-8; torch's own bf16
  norm is off by up to 5e-3;
* on CPU, passes over 32M values or more (the row norms here, the scaling write in :mod:`gradguard.scaling`) run
  as 4M-value tasks on ``torch.get_num_threads()`` worker threads whose kernels are single-threaded, handed out
  dynamically: a multi-threaded kernel per tensor waits for a descheduled thread whenever other processes keep a
  core busy; the bits do not depend on it;
* on CPU, other orders: views of at most 16K values in one ``torch._foreach_norm`` call (torch's kernel is
  inaccurate on longer vectors); the inf-norm by ``aminmax``; float16 tensors (and bf16 per-tensor norms) upcast
  chunk by chunk into a small cache-resident buffer, exactly;
  when only the total is needed, small tensors concatenated so that thousands of them cost a few kernel calls;
* every order torch accepts: ``p > 0``, ``inf``, and ``0``, ``p < 0``, ``-inf`` (per-tensor norms by torch's
  kernel, combined as torch combines them: for ``p = 0`` the total counts the tensors with a non-zero entry);
* finite inputs never give an infinite norm for ``p > 0``: on CPU a result that is non-finite or tiny is recomputed
  as ``m ‖g/m‖_p`` from the largest magnitude ``m`` (only then: one host read of a CPU scalar decides), and norms
  are always combined that way with device ops. Orders ``p <= 0`` are torch's computation, overflow included (the
  -2-norm of float32 values of 1e30 is ``inf`` in both);
* on accelerators, one ``torch._foreach_norm`` call per group (a fused multi-tensor kernel); nothing is read back
  to the host. On CUDA its 1- and 2-norms are asked for in float64, and torch's kernel accumulates in its output
  dtype: the same single pass, and no finite float32 / 16-bit gradient overflows it;
* empty tensors add nothing: norm 0 for ``p >= 0`` and inf, inf (the identity) for ``p < 0`` and ``-inf``;
* inside :func:`device_path` (the no-host-read path: ``Guard(host_sync=False)``, the Monitor's per-layer norms,
  and the tests' stand-in for an accelerator), CPU 2-norm totals take the row kernel too, and other CPU norms
  (per-tensor norms, other orders, float16) are taken in 16K-value pieces through one 1 MiB upcast buffer
  (float32-accurate, no whole-tensor copy); while ``torch.compile`` traces, CPU tensors take the accelerator path
  (no host read, no graph break), and a ``torch.cond`` in the graph recomputes a non-finite or tiny float32 /
  bfloat16 2-norm total with float64 accumulation.
  Eager on the CPU, a 2-norm total that comes out non-finite or tiny is recomputed as ``m ‖g/m‖`` with device ops
  (the decision is a shape, not a value read: see :func:`_eager_rescue`).
  Not rescued on a path with no host read: accelerators other than CUDA (float32 squares overflow above about
  1.8e19 and underflow below about 1e-19); on CUDA, ``foreach=False`` and orders other than 1 and 2 (p-th powers in
  float32); on the CPU, per-tensor norms and orders other than 2. There a total that overflows is ``inf`` and the
  step is skipped as non-finite.

A NaN anywhere gives a NaN norm, an infinite element an infinite norm, so ``torch.isfinite(total)`` is the
finite flag of the whole gradient set at no extra cost.

Distributed training (see :mod:`gradguard.distributed` for the formulas):

* **DTensor** gradients (FSDP2 ``fully_shard``, tensor parallel) are recognised by type: the engine reads their
  local shards with the kernels above, then all-reduces :math:`\|g^{(r)}\|_p^p` (SUM; MAX for ``p = inf``) over the
  mesh dimensions that shard them, never over replicated ones. Per-tensor norms are the norms of the full tensors;
  the total is the norm of the full model, as one process holding everything would compute it.
* ``process_group``: the ranks of the group hold *disjoint* gradients (pipeline stages, experts): the total (and
  :func:`combine_norms`) is reduced over it. Per-tensor norms are local already and need no reduction.
* Plain tensors without a ``process_group`` are taken as complete: DDP gradients are replicated after its
  all-reduce, so summing them over ranks would count each one world-size times.
* With ``torch.distributed`` not initialised, or no DTensor and no ``process_group``, no collective is issued and
  nothing is read back to the host.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from gradguard import distributed
from gradguard._checks import COMPLEX_DTYPES, FLOAT_DTYPES, check_gradient, check_norm_type
from gradguard._compat import device_has_foreach_support
from gradguard._nograd import no_grad

__all__ = [
    "accumulation_dtype",
    "check_tensors",
    "combine_norms",
    "group_by_device_and_dtype",
    "group_norms",
    "tensor_norms",
    "total_norm",
    "unit_norms",
    "use_foreach",
]

_SMALL = 1 << 16  # tensors with fewer elements are batched together on CPU when only the total is needed
_DIRECT = 1 << 13  # float32/float64 tensors with at least this many elements: one torch._foreach_norm call for all
_SEG = 1 << 14  # torch's CPU norm kernel is accurate up to about this many elements (see _partial), so longer
# vectors are reduced as views of this length, all in one _foreach_norm call
_SPLIT = 1 << 16  # ...those longer than this (shorter ones: one view each, error <= 1.5e-6; splitting costs Python)
_FEW = 64  # this many same-dtype tensors or fewer, all float32/float64 and small: one _foreach_norm, nothing else
_CHUNK = 1 << 18  # elements per float32 upcast chunk for reduced-precision tensors on CPU (1 MiB buffer)
_SUPPORTED = FLOAT_DTYPES | COMPLEX_DTYPES


# ------------------------------------------------------------------------------------------ CPU worker threads
# Long CPU passes (the row norms here, the scaling write in gradguard.scaling) run as tasks of about _TASK values on
# torch.get_num_threads() Python worker threads, each of whose torch kernels is single-threaded (its OpenMP thread
# count is set to 1: that setting is per thread), instead of one multi-threaded kernel per tensor. Why: an OpenMP
# kernel splits its work statically across the cores and waits for the slowest part, so when other processes keep a
# core busy every call waits for a descheduled thread (measured on the 2-core machine under load: a per-tensor
# multi-threaded pass 3x-9x slower than torch's single-threaded norm). Tasks are handed out dynamically, so a
# descheduled worker just does fewer of them. The results do not depend on who computes what: each row is reduced by
# one thread, and they are combined in a fixed order, so the same gradients give the same bits. Without an OpenMP
# runtime to set per thread (another ATen backend), with one thread, or for less than 32M values (where handing
# tasks out costs more than it saves), kernels run inline with torch's own threading.
_TASK = 1 << 22  # values per task (16 MiB of float32): ~1 ms of work against ~5 us to hand a task out
_POOL_MIN = 8  # fewer tasks (under 32M values) run inline: waking the workers costs ~0.2 ms, and on ResNet-50
# (25.6M values) idle the workers were measured slower than torch's own threading. One reason: after every
# multi-threaded torch kernel (the backward pass, the restore of a benchmark) libgomp's idle worker spins for 4-8 ms
# of CPU before it sleeps, so for that long a Python worker shares the second core with it.
_T = TypeVar("_T")


class _Pool:
    """``n`` worker threads, all started at once (``concurrent.futures.ThreadPoolExecutor`` starts a second thread only
    when none is idle, so short tasks all ran on one), taking jobs from one queue."""

    def __init__(self, n: int, init: Callable[[], None]) -> None:
        self.jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.threads = [
            threading.Thread(target=self._run, args=(init,), name=f"gradguard-cpu-{i}", daemon=True) for i in range(n)
        ]
        for t in self.threads:
            t.start()

    def _run(self, init: Callable[[], None]) -> None:
        init()
        while (job := self.jobs.get()) is not None:
            job()

    def map(self, fn: Callable[[Any], _T], items: Sequence[Any]) -> list[_T]:
        results: list[Any] = [None] * len(items)
        errors: list[BaseException] = []
        left = [len(items)]
        lock = threading.Lock()
        done = threading.Event()

        def job(i: int, item: Any) -> None:
            try:
                with torch.no_grad():  # grad mode is per thread
                    results[i] = fn(item)
            except BaseException as e:  # re-raised in the caller
                errors.append(e)
            finally:
                with lock:
                    left[0] -= 1
                    if not left[0]:
                        done.set()

        for i, item in enumerate(items):
            self.jobs.put(functools.partial(job, i, item))
        done.wait()
        if errors:
            raise errors[0]
        return results

    def shutdown(self) -> None:
        for _ in self.threads:
            self.jobs.put(None)


class _Workers:
    """The lazily started pool of single-threaded torch workers (recreated when the thread count changes, dropped
    in a forked child, whose copy has no threads)."""

    def __init__(self) -> None:
        self.pool: _Pool | None = None
        self.size = 0
        self.lock = threading.Lock()
        self.omp_set_num_threads: Any = None
        self.probed = False

    def omp(self) -> Any:
        """``omp_set_num_threads`` (probed once), or None."""
        if not self.probed:
            self.omp_set_num_threads = _omp_set_num_threads()
            self.probed = True
        return self.omp_set_num_threads

    def get(self) -> _Pool | None:
        n = torch.get_num_threads()
        if n < 2:
            return None
        with self.lock:
            if self.omp() is None:
                return None
            if self.pool is None or self.size != n:
                if self.pool is not None:
                    self.pool.shutdown()
                self.pool = _Pool(n, self.single_threaded)
                self.size = n
            return self.pool

    def single_threaded(self) -> None:
        """A worker's initializer: torch's per-thread lazy init first (it would set the process's thread count on the
        thread's first parallel call), then this thread's OpenMP thread count to 1."""
        torch.get_num_threads()
        self.omp_set_num_threads(1)

    def forget(self) -> None:
        self.pool, self.size, self.lock = None, 0, threading.Lock()


def _omp_set_num_threads() -> Any:
    """libgomp's ``omp_set_num_threads`` when ATen runs on OpenMP and it is loaded, else None."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        return ctypes.CDLL(None).omp_set_num_threads
    except (OSError, AttributeError):  # pragma: no cover - platforms without a global symbol table
        return None


_WORKERS = _Workers()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_WORKERS.forget)


@contextmanager
def single_threaded() -> Iterator[None]:
    """Inside, torch's CPU kernels called from this thread run on one OpenMP thread (the setting is per thread).

    For many short kernels on cache-resident data (the concatenated small tensors): an OpenMP fork/join per call
    costs more than the kernel, and with another process on a core every call waits for a descheduled thread
    (measured on 5,000 small tensors: 1.45x torch's ``_foreach_norm`` multi-threaded, 0.89x single-threaded, idle;
    2.6x / 0.92x busy). A no-op with one thread or without an OpenMP runtime; the bits do not depend on it.
    """
    n = torch.get_num_threads()  # first: torch's per-thread lazy init would reset the count on the first call
    setter = _WORKERS.omp() if n > 1 and not torch.compiler.is_compiling() else None
    if setter is None:
        yield
        return
    setter(1)
    try:
        yield
    finally:
        setter(n)


def cpu_map(fn: Callable[[Any], _T], tasks: Sequence[Any]) -> list[_T]:
    """``[fn(t) for t in tasks]``, in order, on the single-threaded CPU workers (inline, with torch's own threading,
    for fewer than _POOL_MIN tasks or one thread)."""
    pool = _WORKERS.get() if len(tasks) >= _POOL_MIN and not torch.compiler.is_compiling() else None
    if pool is None:
        return [fn(t) for t in tasks]
    return pool.map(fn, tasks)


def worth_workers(values: int) -> bool:
    """Whether a CPU pass over ``values`` values is long enough for the workers (else :func:`cpu_map` runs inline:
    callers may then skip cutting it into tasks)."""
    return values >= _TASK * _POOL_MIN


def cpu_tasks(pieces: Iterable[Tensor]) -> list[list[Tensor]]:
    """Pieces (tensors or views) batched into tasks of about _TASK values, in order; a piece is never split."""
    tasks: list[list[Tensor]] = []
    cur: list[Tensor] = []
    size = 0
    for piece in pieces:
        cur.append(piece)
        size += piece.numel()
        if size >= _TASK:
            tasks.append(cur)
            cur, size = [], 0
    if cur:
        tasks.append(cur)
    return tasks


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms of ``dtype`` tensors are accumulated and returned in: float64 for 64-bit, else float32."""
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32


def group_by_device_and_dtype(tensors: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of ``tensors`` grouped by ``(device, dtype)``, in first-seen order."""
    by_key: dict[object, list[int]] = {}
    for i, t in enumerate(tensors):  # CPU tensors are keyed by dtype alone: building devices is the slow part
        key = t.dtype if t.is_cpu else (t.device, t.dtype)
        group = by_key.get(key)
        if group is None:
            by_key[key] = [i]
        else:
            group.append(i)
    cpu = torch.device("cpu")
    return {(k if isinstance(k, tuple) else (cpu, k)): v for k, v in by_key.items()}  # type: ignore[misc]


def combine_norms(norms: Tensor, norm_type: float, *, process_group: dist.ProcessGroup | None = None) -> Tensor:
    """The p-norm of a vector of norms: the total norm of the tensors they came from.

    With ``process_group`` the result is also reduced over that group (its ranks hold disjoint tensors), so every
    rank gets the norm of all of them; a no-op when ``torch.distributed`` is not initialised.
    """
    if norms.numel() == 0:
        total = norms.new_zeros(())
    elif norm_type == math.inf:
        total = norms.amax()  # amax propagates NaN
    elif norm_type == -math.inf:
        total = norms.amin()  # amin propagates NaN
    elif norm_type <= 0:  # 0: the count of non-zero norms; < 0: entries of inf (empty tensors) add nothing
        total = torch.linalg.vector_norm(norms, norm_type)
    else:
        total = _scaled_pnorm(norms, norm_type)
    if process_group is not None:
        _check_reducible(norm_type)
        distributed.all_reduce_norms_(total, norm_type, process_group)
    return total


def _scaled_pnorm(v: Tensor, p: float) -> Tensor:
    """``‖v‖_p`` for finite ``p > 0`` computed as ``m ‖v / m‖_p`` with ``m = max v``, so it never overflows while the
    true norm is finite (``[3e19, 3e19]`` gives ``4.2e19``, not ``inf``). Device ops only: no host read."""
    m = v.amax()
    s = torch.where((m > 0) & torch.isfinite(m), m, torch.ones_like(m))  # inf / NaN / 0: the plain norm is right
    return torch.linalg.vector_norm(v / s, p) * s


def _check_reducible(p: float) -> None:
    if p in (0.0, -math.inf):
        raise ValueError(
            f"norm_type={p} cannot be reduced across ranks (DTensor or process_group): it is not a sum of powers "
            "nor a max; use a norm_type > 0, a finite negative one, or inf"
        )


_DEVICE_PATH: ContextVar[bool] = ContextVar("gradguard_device_path", default=False)


@contextmanager
def device_path() -> Iterator[None]:
    """Inside, CPU tensors take the accelerator path too: no host reads and no Python branches on values (the CPU
    shortcuts — skipping a write when nothing clips, the overflow rescue decided on the host — are off).

    ``Guard(host_sync=False)``, ``gg.attach(..., host_sync=False)`` and the Monitor's per-layer statistics run
    inside it, so their no-host-read promise holds on every device; tests run :func:`gradguard.fused_clip_step`
    inside it to check on CPU the path it takes on an accelerator. torch.compile tracing gets the same path
    automatically.
    """
    token = _DEVICE_PATH.set(True)
    try:
        yield
    finally:
        _DEVICE_PATH.reset(token)


def host_reads_allowed() -> bool:
    """Whether the CPU shortcuts may read values on the host: not while torch.compile traces (a read would break the
    graph) and not inside :func:`device_path`."""
    if torch.compiler.is_compiling():  # first: a ContextVar read does not trace
        return False
    return not _DEVICE_PATH.get()


def _exotic(p: float) -> bool:
    """Orders ``p <= 0`` and ``-inf``: no partials to merge, per-tensor norms by torch's kernel, then combined."""
    return p <= 0


def _empty_norm(p: float, dtype: torch.dtype, device: torch.device | None = None) -> Tensor:
    """The norm of an empty tensor: 0 for ``p >= 0`` and inf, inf (the identity of the combination) for ``p < 0``."""
    return torch.full((), math.inf if p < 0 else 0.0, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------------- CPU kernels
# CPU reductions work on *partials*: the max of |x| for p = inf, and the p-norm itself otherwise, always by torch's
# own reduction kernels (linalg.vector_norm, _foreach_norm), never by a BLAS dot: measured on the busy 2-core machine,
# each MKL dot call waits for the descheduled second thread (GPT-2 small fp32: 148 dots 808-993 ms, one
# _foreach_norm 130-136 ms, one torch.sum per tensor 626 ms). torch's fp32 norm kernel is not accurate on long
# vectors (relative error 1.6e-6 at 262K values, 7e-4 at 16M; torch's own clip_grad_norm_ is off by 8.5e-4 on GPT-2
# small), so vectors are reduced as views of _SEG values in one _foreach_norm call, and the view norms combined
# (measured at 16K: 1e-7 on zero-mean data, 1.5e-6 with a large common offset). Partials of disjoint pieces
# combine into the partial of their union (_merge).
#
# Except for p = 2, the hot path: there every float32 / float64 / bfloat16 tensor of _DIRECT values or more is read
# once, as rows of _ROW values, by one ``torch.linalg.vector_norm(rows, dim=-1)`` call per tensor (torch's own
# last-dimension reduction, parallel over rows, vectorised, accumulating in float32 / float64; the bf16 kernel reads
# bf16 directly, without the upcast copy that every fp32-output variant makes). The row norms of all tensors (and
# the norms of their < _ROW-value tails) are combined in float64. Why rows:
#
# * accuracy: each row is a short sum (fp32: row error <= 4e-7 even on constant data, where 16K-value views are off
#   by 9e-6), and the row errors are independent, so the total is within ~1e-8 of float64 on 10^5 rows;
# * one kernel for every machine state: torch's reduction of a whole 1-D tensor is single-threaded (it parallelises
#   over outputs, and there is one), and BLAS dots (MKL) stall on a descheduled thread when other processes keep the
#   cores busy; rows split across threads by torch's own parallel_for, a fixed partition, so the same gradients give
#   the same bits whatever the load and the thread count;
# * bfloat16: torch's bf16 row kernel rounds each row's norm to bf16 (relative error <= 2^-8, measured mean 1.4e-3);
#   bf16 tensors of 8K-64K values are reduced whole (one rounded norm each, as torch does for every tensor). These
#   errors are independent, so the total's relative error is about 1.6e-3 / sqrt(pieces): ~6e-6 on GPT-2 small (121K
#   rows), ~2e-4 on one 64K-value tensor, never more than 2^-8, the gradients' own resolution. torch's own bf16 norm
#   rounds each tensor's norm and accumulates a whole tensor in one chain (5e-3 on 38M values). The exact
#   alternative, upcasting chunk by chunk, makes two calls per 256K values and a copy: it was 1.1x-2x torch. Per-tensor
#   norms (tensor_norms) keep it, and so does fp16 (fp16 row norms are slower than torch and overflow at 65504).
_ROW = 1 << 10
_ROW_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


_ROW_EXACT = (_ROW, _ROW // 2, _ROW // 4, _ROW // 8)  # a tensor under _ROW_TAIL values takes the first that divides it
_ROW_TAIL = 1 << 20  # ...larger ones rows of _ROW and a tail: one more op, but the long rows are cheaper per value


def _row_view(t: Tensor) -> tuple[Tensor, Tensor | None]:
    """``t`` as ``(rows, tail)``: a 2-D view of rows of at most _ROW values, and the values left over (or None).

    Rows are as long as possible (the kernel pays per row) and, below _ROW_TAIL values, of a length that divides the
    tensor, so that most tensors are one view and one kernel call (per call, Python costs more than a short read).
    """
    n = t.numel()
    if n < _ROW_TAIL:
        for c in _ROW_EXACT:
            if n % c == 0:
                return t.view(-1, c) if t.is_contiguous() else t.reshape(-1, c), None
    v = t.reshape(-1)
    r = n // _ROW
    return v[: r * _ROW].view(r, _ROW), (v[r * _ROW :] if n > r * _ROW else None)


def _rows_total(
    tensors: Sequence[Tensor], acc: torch.dtype, small: Sequence[Tensor] = (), longest: int | None = None
) -> Tensor:
    """The 2-norm of same-dtype tensors (each of at least _DIRECT values), combined in float64; in ``acc``.

    Every tensor is read as rows (views of at most _TASK values, on the CPU workers), except bf16 tensors of at most
    _SPLIT values: those, and the tails, are one ``_foreach_norm`` call (each a single short reduction; one Python
    call for all, no copy: for 64 bf16 tensors of 16K-64K values rows cost 40% more than torch's one reduction per
    tensor). ``small`` tensors (non-empty, fewer than _DIRECT values) join as one more ``_foreach_norm`` call in
    ``acc``; every norm is combined in one float64 reduction (a handful of calls in all: after the gradients have
    been written, each small call costs 10-30 us of cold caches). ``longest``: the largest tensor's number of
    values, when the caller knows it. No host read: also the CPU kernel of :func:`device_path`.
    """
    pieces: list[Tensor] = []
    bf16 = bool(tensors) and tensors[0].dtype == torch.bfloat16
    if bf16 and longest is not None and longest <= _SPLIT:
        whole = list(tensors)  # one short reduction each (see above): no pass to sort them
        tensors = ()
    else:
        whole = []  # bf16 tensors of at most _SPLIT values, and tails
    step = _TASK // _ROW
    for t in tensors:
        if bf16 and t.numel() <= _SPLIT:
            whole.append(t)
            continue
        rows, tail = _row_view(t)
        pieces.extend(torch.split(rows, step) if rows.shape[0] > step else (rows,))
        if tail is not None:
            whole.append(tail)
    norms = [n for batch in cpu_map(_row_norms, cpu_tasks(pieces)) for n in batch]
    if whole:
        norms.append(torch.stack(torch._foreach_norm(whole, 2.0)))
    if small:
        norms.append(torch.stack(torch._foreach_norm(list(small), 2.0, dtype=acc)))
    flat = norms[0] if len(norms) == 1 else torch.cat(norms)
    return torch.linalg.vector_norm(flat, dtype=torch.float64).to(acc)


def _row_norms(pieces: list[Tensor]) -> list[Tensor]:
    """The row norms of each 2-D piece: one worker task."""
    return [torch.linalg.vector_norm(rows, dim=-1) for rows in pieces]


def _partial(v: Tensor, p: float) -> Tensor:
    """The partial of a 1-D contiguous float32/float64 vector, in its dtype."""
    if v.numel() == 0:
        return v.new_zeros(())
    if math.isinf(p):
        lo, hi = torch.aminmax(v)
        return torch.maximum(lo.abs(), hi.abs())  # NaN propagates through aminmax and maximum
    if v.numel() <= _SPLIT:
        return torch.linalg.vector_norm(v, p)
    if p == 2.0:  # row norms (see above); at most _CHUNK values here, so a float32 combine of <= 2048 rows
        rows, tail = _row_view(v)
        norms = torch.linalg.vector_norm(rows, dim=-1)
        if tail is not None:
            norms = torch.cat([norms, torch.linalg.vector_norm(tail).view(1)])
        return torch.linalg.vector_norm(norms)
    return _norms_partial(torch.stack(torch._foreach_norm(torch.split(v, _SEG), p)), p)


def _merge(parts: list[Tensor], p: float) -> Tensor:
    """The partial of the union of disjoint pieces, from theirs."""
    if len(parts) == 1:
        return parts[0]
    stacked = torch.stack(parts)
    if math.isinf(p):
        return stacked.amax()
    return torch.linalg.vector_norm(stacked, p)


def _norms_partial(norms: Tensor, p: float) -> Tensor:
    """The partial of the union of tensors, from their norms."""
    return norms.amax() if math.isinf(p) else torch.linalg.vector_norm(norms, p)


class _UpcastBuffer:
    """A reusable float32/float64 scratch buffer, so reduced-precision tensors are read once and never copied whole."""

    def __init__(self) -> None:
        self._bufs: dict[torch.dtype, Tensor] = {}

    def get(self, n: int, dtype: torch.dtype) -> Tensor:
        buf = self._bufs.get(dtype)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype)  # chunks are at most _CHUNK: the first one sizes it for the rest
            self._bufs[dtype] = buf
        return buf[:n]


def _cpu_tensor_partial(t: Tensor, p: float, scratch: _UpcastBuffer) -> Tensor:
    """The partial of one real CPU tensor, in its accumulation dtype (reduced precision: upcast chunk by chunk)."""
    acc = accumulation_dtype(t.dtype)
    if t.numel() == 0:
        return torch.zeros((), dtype=acc)
    if t.dtype == acc:
        return _partial(t.reshape(-1), p)  # a view when contiguous
    parts = []
    for chunk in torch.split(t.reshape(-1), _CHUNK):
        buf = scratch.get(chunk.numel(), acc)
        buf.copy_(chunk)
        parts.append(_partial(buf, p))
    return _merge(parts, p)


def _cpu_tensor_norm(t: Tensor, p: float, scratch: _UpcastBuffer) -> Tensor:
    """Norm of one CPU tensor in its accumulation dtype."""
    if t.is_complex():
        return torch.linalg.vector_norm(t, p) if t.numel() else _empty_norm(p, accumulation_dtype(t.dtype))
    return _cpu_tensor_partial(t, p, scratch)


def _cpu_group_total(tensors: list[Tensor], p: float, scratch: _UpcastBuffer, *, common: bool = True) -> Tensor:
    """Total norm of a same-dtype CPU group.

    float32/float64 tensors of ``_DIRECT`` elements or more, and bf16 ones for ``p = 2``, are reduced together: by
    row norms for ``p = 2`` (:func:`_rows_total`), else by views in one ``torch._foreach_norm`` call. Other large
    reduced-precision tensors are upcast chunk by chunk; small tensors are concatenated (grouped by trailing shape,
    so no per-tensor reshape is needed) into the scratch buffer, upcast on the way, and reduced a batch at a time
    (thousands of them in a few calls).
    """
    acc = accumulation_dtype(tensors[0].dtype)
    if tensors[0].is_complex():
        return combine_norms(torch.stack([_cpu_tensor_norm(t, p, scratch) for t in tensors]), p)
    if common:  # (common=False: the caller has just tried it on these tensors)
        total = _cpu_common_total(tensors, p)
        if total is not None:
            return total
    native = tensors[0].dtype == acc
    parts, by_rest, direct = _partition(tensors, p, native, scratch)
    for rest, items in by_rest.items():
        parts.extend(_concatenated_partials(rest, items, p, acc, scratch))
    if direct and p == 2.0:
        parts.append(_rows_total(direct, acc))
    elif direct:
        views = [c for t in direct for c in (torch.split(t.reshape(-1), _SEG) if t.numel() > _SPLIT else (t,))]
        parts.append(_norms_partial(torch.stack(torch._foreach_norm(views, p)), p))
    if not parts:
        return torch.zeros((), dtype=acc)
    return _cpu_rescue_total(_merge(parts, p), tensors, p)


def _cpu_common_total(tensors: list[Tensor], p: float = 2.0) -> Tensor | None:
    """The total norm (``p > 0`` or inf) of the common CPU case in one pass over the tensors, else None (the general
    path of :func:`_cpu_group_total` applies).

    The common case: every tensor on the CPU, of one dtype among float32 / float64 / bfloat16, and either
    (a) float32/float64, at most _FEW tensors of at most _SPLIT values: fixed costs only, one ``_foreach_norm`` over
    all of them in input order, combined in their dtype (torch's own computation, so the same bits as
    ``torch.nn.utils.get_total_norm`` where nothing overflows; empty tensors are included for ``p = 2``, while for
    other orders, inf among them, a group with an empty tensor takes the general path), or (b) ``p = 2`` and at
    least one tensor of _DIRECT values or more, beside at most _FEW smaller non-empty ones (:func:`_rows_total`,
    the small ones joining as one more call). The same kernels whether the tensors are a whole call or one dtype
    group of it; what it saves is Python: each pass over the tensors, and each layer of calls, costs tens of
    microseconds on caches cold from the gradients just written (measured on 64 tensors of 16K-64K values: the
    grouping, the partition and the row pass cost ~90 us over a bare ``_foreach_norm``, on a ~0.5 ms norm).
    """
    dtype = tensors[0].dtype
    acc = accumulation_dtype(dtype)
    if dtype not in _ROW_DTYPES or (p != 2.0 and dtype != acc):  # bf16 takes case (b) only
        return None
    large: list[Tensor] = []
    small: list[Tensor] = []
    longest = 0
    for t in tensors:
        if t.dtype != dtype or not t.is_cpu:
            return None
        n = t.numel()
        if n >= _DIRECT:
            if n > _SPLIT and p != 2.0:  # neither case: bail out early
                return None
            large.append(t)
            longest = max(longest, n)
        elif n:
            if len(small) == _FEW:  # many small tensors: concatenated by the general path (bail out early)
                return None
            small.append(t)
        elif p != 2.0:  # an empty tensor: case (a) for 2-norms only (torch has no inf-norm of an empty tensor)
            return None
    if dtype == acc and len(large) + len(small) <= _FEW and longest <= _SPLIT:
        if not large and not small:
            return torch.zeros((), dtype=acc)
        total = _norms_partial(torch.stack(torch._foreach_norm(tensors, p)), p)  # in order, as torch
    elif large and p == 2.0:
        total = _rows_total(large, acc, small, longest)
    else:
        return None
    return _cpu_rescue_total(total, tensors, p)


def _partition(
    tensors: list[Tensor], p: float, native: bool, scratch: _UpcastBuffer
) -> tuple[list[Tensor], dict[object, list[tuple[Tensor, int]]], list[Tensor]]:
    """Split a CPU group into the partials of large reduced-precision tensors (computed here), the small tensors by
    trailing shape (to be concatenated), and the large native ones, and bf16 ones for p = 2 (reduced together)."""
    parts: list[Tensor] = []
    by_rest: dict[object, list[tuple[Tensor, int]]] = {}
    direct: list[Tensor] = []
    rows = native or (p == 2.0 and tensors[0].dtype == torch.bfloat16)  # bf16 2-norms: row norms too
    for t in tensors:
        n = t.numel()
        if rows and n >= _DIRECT:
            direct.append(t)
        elif n >= _SMALL:
            parts.append(_cpu_tensor_partial(t, p, scratch))
        elif n:
            d = t.dim()
            key = d if d < 2 else t.shape[1:]  # 0-d and 1-d tensors need no shape
            by_rest.setdefault(key, []).append((t, n))
    return parts, by_rest, direct


def _concatenated_partials(
    rest: object, items: list[tuple[Tensor, int]], p: float, acc: torch.dtype, scratch: _UpcastBuffer
) -> list[Tensor]:
    """Partials of small tensors sharing a trailing shape: concatenated into the scratch buffer (upcast on the way)
    at most ``_CHUNK`` values at a time, one reduction per batch."""
    if rest == 0:
        return [_partial(torch.stack([t for t, _ in items]).to(acc), p)]
    shape = () if rest == 1 else tuple(rest)  # type: ignore[arg-type]
    row = math.prod(shape)
    parts = []
    start = 0
    with single_threaded():  # short calls on a cache-resident buffer
        while start < len(items):
            end, size = start, 0
            while end < len(items) and (end == start or size + items[end][1] <= _CHUNK):
                size += items[end][1]
                end += 1
            buf = scratch.get(size, acc)
            torch.cat([t for t, _ in items[start:end]], out=buf.view(size // row, *shape))
            parts.append(_partial(buf, p))
            start = end
    return parts


def _cpu_group_norms(tensors: list[Tensor], p: float, scratch: _UpcastBuffer) -> list[Tensor]:
    """Per-tensor norms of a same-dtype CPU group: one foreach call; large reduced-precision ones upcast in chunks."""
    acc = accumulation_dtype(tensors[0].dtype)
    out: list[Tensor] = [None] * len(tensors)  # type: ignore[list-item]
    small = []  # one foreach call: every float32/float64 tensor, and small reduced-precision ones
    native = tensors[0].dtype == acc
    for i, t in enumerate(tensors):
        n = t.numel()
        if (n >= _SMALL and not native) or n == 0 or t.is_complex():
            out[i] = _cpu_tensor_norm(t, p, scratch)
        else:
            small.append(i)
    if small:
        views: list[Tensor] = []
        owner: list[int] = []
        for k, i in enumerate(small):
            t = tensors[i]
            pieces = torch.split(t.reshape(-1), _SEG) if native and t.numel() > _SPLIT else (t,)
            views.extend(pieces)
            owner.extend([k] * len(pieces))
        seg_norms = torch.stack(torch._foreach_norm(views, p, dtype=acc))
        if len(views) > len(small):
            index = torch.tensor(owner)
            seg_norms = group_norms(seg_norms, index, len(small), p)
        for i, norm in zip(small, seg_norms.unbind()):
            out[i] = norm
    if not math.isinf(p):  # a CPU read: free
        values = torch.stack(out).tolist()
        if any(_suspect(v, p, acc) for v in values):
            out = [_scaled_total([t], acc, p) if _suspect(v, p, acc) else n for v, n, t in zip(values, out, tensors)]
    return out


# ----------------------------------------------------------------------------------------- accelerator kernels
def use_foreach(device: torch.device, foreach: bool | None) -> bool:
    """Whether to use the foreach kernels on ``device``; ``foreach=True`` on a device without them raises."""
    supported = device_has_foreach_support(device)
    if foreach and not supported:
        raise RuntimeError(f"foreach=True was passed, but can't use the foreach API on {device.type} tensors")
    return supported and foreach is not False


def _wide(device: torch.device, p: float, acc: torch.dtype) -> bool:
    """Whether torch's fused ``_foreach_norm`` accumulates in float64 here: on CUDA (and ROCm) its accumulator is the
    output dtype's (``at::opmath_type<out_t>``), so asking for float64 output makes the one pass overflow-free for
    float32 / float16 / bfloat16 gradients (squares up to (3.4e38)^2 fit in float64) at no extra memory traffic. The
    result is cast back to float32. Not on other accelerators (MPS has no float64)."""
    return device.type == "cuda" and p in (1.0, 2.0) and acc == torch.float32


def _device_norms(tensors: list[Tensor], p: float, foreach: bool | None) -> Tensor:
    """Per-tensor norms of a same-(device, dtype) group with device ops only (one fused kernel on an accelerator, no
    host read), stacked: float64 where :func:`_wide` (the caller combines them, then casts), else in the
    accumulation dtype."""
    acc = accumulation_dtype(tensors[0].dtype)
    out: list[Tensor | None] = [None] * len(tensors)
    nonempty = [i for i, t in enumerate(tensors) if t.numel()]
    if nonempty:
        ts = [tensors[i] for i in nonempty]
        if ts[0].is_complex():  # the norm of the modulus: torch picks the real dtype (a real dtype= is an error)
            norms = list(torch._foreach_norm(ts, p)) if use_foreach(ts[0].device, foreach) else [
                torch.linalg.vector_norm(t, p) for t in ts
            ]
        elif use_foreach(ts[0].device, foreach):
            acc = torch.float64 if _wide(ts[0].device, p, acc) else acc
            norms = list(torch._foreach_norm(ts, p, dtype=acc))
        else:
            norms = [torch.linalg.vector_norm(t, p, dtype=None if t.dtype == acc else acc) for t in ts]
        for i, norm in zip(nonempty, norms):
            out[i] = norm
    empty = None
    for i, n in enumerate(out):
        if n is None:
            empty = empty if empty is not None else _empty_norm(p, acc, tensors[i].device)
            out[i] = empty
    return torch.stack(out)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- overflow fallback
# The fast kernels accumulate p-th powers (squares for p = 2) in float32, which overflow once they pass 3.4e38 (a
# single fp32 value of 3e19 has an infinite sum of squares) and lose precision once they fall below 1.2e-38
# (subnormals: values of 1e-20 have an inaccurate norm, values of 1e-25 a norm of 0). When (and only when) a CPU
# result comes out non-finite or below _TINY ** (1/p), it is recomputed here from the largest magnitude m:
# ‖t‖_p = m ‖t / m‖_p, whose largest term is 1. Non-finite inputs give m = inf or NaN, and the result is m itself (the
# true norm); so finite inputs up to the dtype maximum always give a finite, accurate norm. The common case pays one
# host read of a CPU scalar (free on CPU); the no-host-read CPU path decides by a shape instead (_eager_rescue) and
# recomputes with the same _scaled_total.
_TINY = {torch.float32: 1e-20, torch.float64: 1e-280}  # p-th powers summing below this may have lost precision


def _suspect(value: float, p: float, acc: torch.dtype) -> bool:
    """Whether a norm computed from p-th powers may have overflowed or underflowed."""
    return not math.isfinite(value) or (p > 1 and value < _TINY[acc] ** (1.0 / p))


def _cpu_rescue_total(total: Tensor, tensors: list[Tensor], p: float) -> Tensor:
    """``total`` if finite and not tiny, else the overflow-free recomputation (see above); one host read decides."""
    if math.isinf(p) or not _suspect(total.item(), p, total.dtype):
        return total
    return _scaled_total(tensors, total.dtype, p)


def _scaled_total(group: list[Tensor], acc: torch.dtype, p: float = 2.0) -> Tensor:
    """The p-norm (``p > 0``) of CPU tensors as ``m ‖g/m‖_p`` from the largest magnitude ``m``, with device ops only:
    two passes over the gradients and chunk-sized temporaries, for the rare result that overflowed or underflowed
    (the p-th powers of values scaled to at most 1 are summed in float64). Non-finite inputs give ``m`` inf or NaN
    and a result of inf or NaN, as they should. In ``acc``."""
    ts = [t.abs() if t.is_complex() else t for t in group if t.numel()]
    if not ts:
        return _empty_norm(p, acc)
    m = torch.stack([torch.linalg.vector_norm(t, math.inf).to(acc) for t in ts]).amax()
    s = torch.where((m > 0) & torch.isfinite(m), m, torch.ones_like(m))
    chunks = [c for t in ts for c in torch.split(t.reshape(-1), _CHUNK)]
    parts = [torch.linalg.vector_norm(c.to(acc) / s, p, dtype=torch.float64) for c in chunks]
    return (torch.linalg.vector_norm(torch.stack(parts), p) * s).to(acc)


# ----------------------------------------------------------------------------------------------------- public
def check_tensors(tensors: Iterable[Tensor], name: str = "tensors") -> list[Tensor]:
    """``tensors`` as a list, each checked to be a dense floating-point or complex tensor (one cheap pass)."""
    ts = list(tensors)
    bad = [
        i
        for i, t in enumerate(ts)
        if not isinstance(t, Tensor) or t.layout != torch.strided or t.dtype not in _SUPPORTED
    ]
    if bad:
        i = bad[0]
        if not isinstance(ts[i], Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(ts[i]).__name__}")
        check_gradient(ts[i], f"{name}[{i}]")  # raises with the precise reason
    return ts


@no_grad
def tensor_norms(
    tensors: Iterable[Tensor], norm_type: float | str = 2.0, foreach: bool | None = None, *, check: bool = True
) -> Tensor:
    """Per-tensor p-norms as one 1-D tensor on the first tensor's device, in input order.

    Each entry is :math:`\\|g_i\\|_p` accumulated in float32 (float64 if any input is 64-bit); no host
    synchronisation. ``check=False`` skips argument checks the caller has already made. A DTensor's entry is the
    norm of the whole (sharded) tensor: one all-reduce per distinct set of sharded mesh dimensions.

    >>> import torch, gradguard.norms as N
    >>> N.tensor_norms([torch.tensor([3.0, 4.0]), torch.tensor([-2.0])], 2)
    tensor([5., 2.])
    """
    p = check_norm_type(norm_type, any_order=True) if check else float(norm_type)
    ts = check_tensors(tensors) if check else list(tensors)
    if not ts:
        return torch.zeros(0)
    sharded = _dtensor_groups(ts)
    if sharded is not None:
        _check_reducible(p)
        ts, by_groups = sharded
        out_all = _local_tensor_norms(ts, p, foreach)
        for groups, idx in by_groups.items():
            index = torch.tensor(idx, device=out_all.device)
            part = distributed.reduce_over_groups_(out_all.index_select(0, index), p, groups)
            out_all.index_copy_(0, index, part)
        return out_all
    return _local_tensor_norms(ts, p, foreach)


def _local_tensor_norms(ts: list[Tensor], p: float, foreach: bool | None) -> Tensor:
    first = ts[0].device
    out: list[Tensor] = [None] * len(ts)  # type: ignore[list-item]
    scratch = _UpcastBuffer()
    for (device, _), idx in group_by_device_and_dtype(ts).items():
        group = [ts[i] for i in idx]
        if device.type == "cpu" and host_reads_allowed() and not _exotic(p):
            norms = _cpu_group_norms(group, p, scratch)
        elif device.type == "cpu" and not _exotic(p) and not torch.compiler.is_compiling():
            norms = list(_cpu_device_path_norms(group, p).unbind())
        else:
            acc = accumulation_dtype(group[0].dtype)
            norms = list(_device_norms(group, p, None if device.type == "cpu" else foreach).to(acc).unbind())
        for i, n in zip(idx, norms):
            out[i] = n
    return _stack_on(out, first)


@no_grad
def total_norm(
    tensors: Iterable[Tensor],
    norm_type: float | str = 2.0,
    foreach: bool | None = None,
    *,
    check: bool = True,
    process_group: dist.ProcessGroup | None = None,
) -> Tensor:
    """The p-norm of all ``tensors`` viewed as one vector, a 0-d tensor on the first tensor's device.

    float32 (float64 if any input is 64-bit); ``tensor(0.)`` for no tensors; no host synchronisation.
    ``check=False`` skips argument checks the caller has already made. DTensors count as the whole tensors they
    shard (their local norms are reduced over the sharded mesh dimensions); with ``process_group`` the total is
    also reduced over that group, whose ranks hold disjoint tensors (every rank of it must call, even with none).

    >>> import torch, gradguard.norms as N
    >>> N.total_norm([torch.tensor([3.0]), torch.tensor([4.0])])
    tensor(5.)
    """
    p = check_norm_type(norm_type, any_order=True) if check else float(norm_type)
    ts = check_tensors(tensors) if check else list(tensors)
    if process_group is not None:
        _check_reducible(p)
    sharded = _dtensor_groups(ts) if ts else None
    if sharded is not None:
        _check_reducible(p)
    if sharded is None:
        total = _local_total(ts, p, foreach)
    else:
        local, by_groups = sharded
        in_groups = {i for idx in by_groups.values() for i in idx}
        rest = [t for i, t in enumerate(local) if i not in in_groups]
        parts = [_local_total(rest, p, foreach)] if rest else []
        for groups, idx in by_groups.items():
            part = _local_total([local[i] for i in idx], p, foreach)
            parts.append(distributed.reduce_over_groups_(part, p, groups))
        total = combine_norms(_stack_on(parts, local[0].device), p)
    if process_group is not None:
        distributed.all_reduce_norms_(total, p, process_group)
    return total


def _dtensor_groups(
    ts: list[Tensor],
) -> tuple[list[Tensor], dict[tuple[dist.ProcessGroup, ...], list[int]]] | None:
    """``None`` when no tensor is a DTensor (the single-process path: one type check per tensor). Otherwise the
    tensors with every DTensor replaced by its local shard, and the indices of the sharded ones keyed by the process
    groups their norms must be reduced over (replicated DTensors need none and are not listed)."""
    cls = distributed.dtensor_type()
    if cls is None or not any(isinstance(t, cls) for t in ts):
        return None
    local: list[Tensor] = []
    by_groups: dict[tuple[dist.ProcessGroup, ...], list[int]] = {}
    for i, t in enumerate(ts):
        if isinstance(t, cls):
            t, groups = distributed.dtensor_norm_groups(t)
            if groups:
                by_groups.setdefault(groups, []).append(i)
        local.append(t)
    return local, by_groups


def _local_total(ts: list[Tensor], p: float, foreach: bool | None) -> Tensor:
    if not ts:
        return torch.tensor(0.0)
    if not _exotic(p) and host_reads_allowed():
        common = _cpu_common_total(ts, p)  # one pass, before any grouping: the usual call
        if common is not None:
            return common
    first = ts[0].device
    parts: list[Tensor] = []
    scratch = _UpcastBuffer()
    groups = group_by_device_and_dtype(ts)
    for (device, _), idx in groups.items():
        group = ts if len(groups) == 1 else [ts[i] for i in idx]
        if device.type == "cpu" and host_reads_allowed() and not _exotic(p):
            parts.append(_cpu_group_total(group, p, scratch, common=len(groups) > 1))
        elif device.type == "cpu" and _rows_on_device_path(group, p):
            parts.append(_cpu_device_path_total(group))
        elif device.type == "cpu" and not _exotic(p) and not torch.compiler.is_compiling():
            parts.append(combine_norms(_cpu_device_path_norms(group, p), p))
        else:
            fe = None if device.type == "cpu" else foreach
            acc = accumulation_dtype(group[0].dtype)
            parts.append(combine_norms(_device_norms(group, p, fe), p).to(acc))
    return parts[0] if len(parts) == 1 else combine_norms(_stack_on(parts, first), p)


def _rows_on_device_path(group: list[Tensor], p: float) -> bool:
    """Whether a CPU group on the no-host-read path (:func:`device_path`, e.g. ``Guard(host_sync=False)``, and
    torch.compile tracing, where the rows are traced inline) takes the row kernel: 2-norms of float32/float64/bf16
    gradients (torch's whole-tensor kernel is off by 1e-5 at 1M float32 values)."""
    return p == 2.0 and group[0].dtype in _ROW_DTYPES


def _cpu_device_path_total(group: list[Tensor]) -> Tensor:
    """The 2-norm of a same-dtype CPU group with no host read: large tensors by row norms, the others by one
    ``_foreach_norm`` call, combined in float64 (as :func:`_cpu_group_total`, without its host-side rescue)."""
    acc = accumulation_dtype(group[0].dtype)
    large = [t for t in group if t.numel() >= _DIRECT]
    small = [t for t in group if 0 < t.numel() < _DIRECT]
    if not large and not small:
        return torch.zeros((), dtype=acc)
    total = _rows_total(large, acc, small)  # all combined in float64: squares above 3.4e38 do not overflow there
    if acc != torch.float32:
        return total
    if torch.compiler.is_compiling():
        return _compiled_rescue(total, group)
    return _eager_rescue(total, group)


def _eager_rescue(total: Tensor, group: list[Tensor]) -> Tensor:
    """Eager, no host read: ``total`` if it is finite and not tiny, else :func:`_scaled_total` of the group.

    Deciding needs no value on the host: ``nonzero`` of the 1-element "suspect" mask gives a shape, 0 or 1, which
    this CPU-only path reads as metadata (on CPU the mask is computed there anyway; accelerators never come here: on
    CUDA the fused kernel accumulates in float64). So the common case costs two scalar ops and no pass."""
    suspect = torch.logical_not(torch.isfinite(total)) | (total < _TINY[torch.float32] ** 0.5)
    if suspect.reshape(1).nonzero().shape[0] == 0:
        return total
    return _scaled_total(group, total.dtype)


def _compiled_rescue(total: Tensor, group: list[Tensor]) -> Tensor:
    """While torch.compile traces: ``total`` if it is finite and not tiny, else the group's 2-norm recomputed with
    float64 accumulation (one more pass, fused by the compiler: no copy). A ``torch.cond`` in the graph, so the
    common case costs no extra pass (measured: +3-5% on a compiled 7.1M-value norm, the scalar ops and the branch)
    and there is no host read nor graph break.
    float64 squares hold any float32 / bfloat16 value (up to 1.2e77) and any subnormal (down to 1e-90), so finite
    gradients up to the dtype maximum give a finite, accurate norm there too."""
    cond = getattr(torch, "cond", None)  # public in recent torch; without it, no rescue (documented)
    if cond is None:  # pragma: no cover - torch 2.13 (CI) has it
        return total
    ok = torch.isfinite(total) & (total >= _TINY[torch.float32] ** 0.5)
    return cond(ok, _keep_total, _float64_total, (total, *group))  # type: ignore[no-any-return]


def _keep_total(total: Tensor, *group: Tensor) -> Tensor:
    return total.clone()  # a branch of torch.cond may not return its input as is


def _float64_total(total: Tensor, *group: Tensor) -> Tensor:
    norms = torch.stack([torch.linalg.vector_norm(t, dtype=torch.float64) for t in group])
    return torch.linalg.vector_norm(norms).to(total.dtype)


_STAGE = 1 << 18  # values of the float32 buffer reduced-precision CPU tensors are upcast through (1 MiB at most)


def _cpu_device_path_norms(tensors: list[Tensor], p: float) -> Tensor:
    r"""Per-tensor p-norms (``p > 0``) of a same-dtype CPU group with no host read (:func:`device_path`: the
    Monitor's per-layer statistics, ``Guard(host_sync=False)``), float32-accurate, one small upcast buffer the only
    copy.

    Taken whole, torch's CPU kernel (a) reduces a bf16/fp16 tensor through a float32 copy of all of it (2x the
    tensor's bytes) and (b) accumulates long float32 vectors inaccurately (relative error 1e-5 at 1M values, 2.7e-3
    for GPT-2's 38.6M-value embedding). So a tensor longer than ``_SEG`` values is measured as views of ``_SEG``
    values: a float32/float64 one directly, a bf16/fp16 one block by block through one reused float32 buffer of at
    most ``_STAGE`` values and at most half the tensor's length (so never more than the tensor's own bytes). Its norm
    is the p-norm of its pieces', :math:`\|g\|_p = \|(\|g_1\|_p, \dots, \|g_k\|_p)\|_p` (their max for
    :math:`p = \infty`), by :func:`combine_norms` (overflow-free). Complex tensors are taken whole. Returned stacked,
    in the accumulation dtype. (While torch.compile traces, tensors are taken whole: the compiler fuses the upcast.)
    """
    acc = accumulation_dtype(tensors[0].dtype)
    if tensors[0].is_complex():
        return _device_norms(tensors, p, None).to(acc)
    views: list[Tensor] = []  # measured together, in one call
    spans: list[tuple[int, int] | Tensor] = []  # per tensor: its views' range, or its staged piece norms
    buf: Tensor | None = None
    for t in tensors:
        if t.numel() <= _SEG:
            spans.append((len(views), len(views) + 1))
            views.append(t)
        elif t.dtype == acc:
            start = len(views)
            views.extend(_blocks(t, _SEG))
            spans.append((start, len(views)))
        else:
            blocks = _blocks(t, min(_STAGE, (t.numel() + 1) // 2))
            need = max(b.numel() for b in blocks)
            if buf is None or buf.numel() < need:
                buf = None  # the old one freed before the new one is made
                buf = torch.empty(need, dtype=acc)
            parts = []
            for block in blocks:
                staged = buf[: block.numel()]
                staged.view(block.shape).copy_(block)
                parts.append(_device_norms(list(torch.split(staged, _SEG)), p, None))
            spans.append(torch.cat(parts))
    out = _device_norms(views, p, None).to(acc) if views else None
    result = []
    for span in spans:
        if isinstance(span, Tensor):
            result.append(combine_norms(span, p))
        else:
            assert out is not None
            a, b = span
            result.append(out[a] if b == a + 1 else combine_norms(out[a:b], p))
    return torch.stack(result)


def _blocks(t: Tensor, size: int) -> list[Tensor]:
    """Views of ``t`` of at most about ``size`` values: flat when contiguous, else rows along dim 0."""
    if t.is_contiguous():
        return list(torch.split(t.view(-1), size))
    return list(torch.split(t, max(1, size * t.shape[0] // t.numel()), dim=0))


def _stack_on(values: list[Tensor], device: torch.device) -> Tensor:
    """Stack 0-d tensors on ``device`` in a common accumulation dtype (float64 if any is)."""
    v0 = values[0]
    if all(v.dtype == v0.dtype and v.device == v0.device for v in values):  # one group: the common case
        stacked = torch.stack(values)
        return stacked if v0.device == device else stacked.to(device, non_blocking=device.type != "cpu")
    dtype = torch.float64 if any(v.dtype == torch.float64 for v in values) else torch.float32
    return torch.stack([v.to(device=device, dtype=dtype, non_blocking=device.type != "cpu") for v in values])


def unit_norms(
    tensor: Tensor, view_shape: Sequence[int] | None, reduce_dims: Sequence[int], norm_type: float = 2.0
) -> Tensor:
    """Norms of the *units* of ``tensor``: ``tensor.view(view_shape)`` reduced over ``reduce_dims`` (kept as size 1).

    The result broadcasts against ``tensor.view(view_shape)``, so a per-unit coefficient multiplies it directly.
    Examples of layouts (AGC, Brock et al. 2021): a Linear weight ``[out, in]`` is ``view_shape=(out, -1)``,
    ``reduce_dims=(1,)``; a ConvTranspose weight ``[in, out/g, *k]`` with ``g`` groups is
    ``view_shape=(g, in/g, out/g, -1)``, ``reduce_dims=(1, 3)``. Accumulated in float32 (float64 for float64).

    >>> import torch, gradguard.norms as N
    >>> N.unit_norms(torch.tensor([[3.0, 4.0], [0.0, 2.0]]), (2, -1), (1,))
    tensor([[5.],
            [2.]])
    """
    p = float(norm_type)
    acc = accumulation_dtype(tensor.dtype)
    x = tensor if view_shape is None else tensor.reshape(tuple(view_shape))
    dims = tuple(reduce_dims)
    if x.numel() == 0:
        shape = [1 if d in dims else s for d, s in enumerate(x.shape)]
        return torch.zeros(shape, dtype=acc, device=x.device)
    return torch.linalg.vector_norm(x, p, dim=dims, keepdim=True, dtype=None if x.dtype == acc else acc)


def group_norms(norms: Tensor, group_index: Tensor, num_groups: int, norm_type: float = 2.0) -> Tensor:
    """Combine per-tensor norms into per-group norms: ``out[k] = ‖(norms[i] for i with group_index[i] == k)‖_p``.

    ``group_index`` is a 1-D int64 tensor on ``norms``' device; no host synchronisation.

    >>> import torch, gradguard.norms as N
    >>> N.group_norms(torch.tensor([3.0, 4.0, 2.0]), torch.tensor([0, 0, 1]), 2)
    tensor([5., 2.])
    """
    p = float(norm_type)
    out = norms.new_zeros(num_groups)
    if math.isinf(p):
        return out.scatter_reduce_(0, group_index, norms, reduce="amax", include_self=True)
    return out.index_add_(0, group_index, norms.pow(p)).pow_(1.0 / p)
