"""The split scan both codebook ops run: rows × slices of the K codebook entries, then a merge.

A row's answer is a reduction over K entries (``nearest``: the minimum of ||c_k||^2 - 2 x·c_k;
``codebook_head``: the online softmax and argmax of h·w_k + b_k). One program cannot walk all K
for every row block without leaving the GPU idle at small batches, so the K entries are cut
into S slices of whole BLOCK_K tiles (no slice empty): a partial kernel on the grid
(row block, slice) writes one set of partials per row and slice ([M, S] fp32/int32 arrays),
and a merge kernel reduces each row's S partials, walking them in chunks of BLOCK_S <= 32
(bounded registers for any S) in slice order, so that a tie between slices goes to the first
one, i.e. the lowest entry index.

Here: the backends both register, the slice geometry, the Triton helpers both kernel pairs call (a row block, a slice's
bounds, a chunk of slices, the first index attaining a row's best value), the launch loop and
the compile-check variants, and the CPU paths' row budget and best-of-row (:func:`row_best`).
The reductions themselves stay with their ops.

Index arithmetic. Row offsets into the inputs and the [M, S] partials are int64 (``row_block``),
entry offsets into the [K, D] codebook too (``codebook_tile``); entry numbers, slice numbers and
feature offsets stay int32, which holds for any K and D below 2^31. Nothing here depends on K
beyond the slice count, which the tile count caps (S <= ceil(K / BLOCK_K)).

Scratch. GPU: the partials, a few fp32/int32 words per row and slice, sized by M·S (each op
bounds S), never by K. CPU: one chunk of [rows, K] fp32 scores, with rows cut down for large
codebooks so that a chunk holds at most ``CPU_SCORES`` floats (:func:`cpu_rows`).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .. import native
from ._common import FLOAT_DTYPES, HAS_TRITON, tl, triton
from . import measured
from .registry import Capability, register_op, triton_capability

__all__ = ["slices", "cpu_rows", "row_best", "merge_chunk", "run", "outputs", "scan", "compile_variants",
           "register_backends"]

MAX_MERGE_CHUNK = 32  # slices merged per step: the merge's register footprint
# fp32 scores a CPU chunk may hold (128 MB): the row chunks of 2048 (nearest, up to K = 16,384)
# and 1024 (codebook_head, up to K = 32,768) are kept, and cut beyond (512 rows at K = 65,536)
CPU_SCORES = 1 << 25


def slices(k: int, block_k: int, splits: int) -> tuple[int, int]:
    """(entries per slice, number of slices) for ``splits`` requested slices of K entries:
    whole tiles per slice and no empty slice, so there may be fewer than requested."""
    k_tiles = triton.cdiv(k, block_k)
    k_per = triton.cdiv(k_tiles, max(1, min(splits, k_tiles))) * block_k
    return k_per, triton.cdiv(k, k_per)


def cpu_rows(chunk: int, k: int) -> int:
    """Rows per CPU step: ``chunk``, cut so that rows × K <= ``CPU_SCORES`` (at least one row, so
    a chunk holds at most max(K, CPU_SCORES) floats whatever the codebook's size)."""
    return max(1, min(chunk, CPU_SCORES // max(1, k)))


def row_best(s: torch.Tensor, *, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) [rows] of a float32 block s [rows, K]: each row's minimum (``largest``:
    maximum) and the first column holding it, so ties go to the lowest index; a row holding NaN
    gets NaN and id -1 (the kernels' mark of a NaN row).

    On the CPU, torch's amin/amax (vectorised, threaded) and then ``_C.first_match_cpu``, which
    reads each row up to the value: 4-7x faster than ``s.min(1)``, whose index tracking is
    neither (see csrc/first_match.h). Elsewhere (the torch backend timed on CUDA) ``min``/``max``."""
    if s.device.type != "cpu":
        values, ids = s.max(1) if largest else s.min(1)
        ids[torch.isnan(values)] = -1
        return values, ids
    if s.stride(1) != 1:
        s = s.contiguous()
    values = s.amax(1) if largest else s.amin(1)
    ids = torch.empty(s.shape[0], dtype=torch.int64)
    native.load().first_match_cpu(s.data_ptr(), s.shape[0], s.shape[1], s.stride(0),
                                  values.data_ptr(), ids.data_ptr())
    return values, ids


def merge_chunk(nsplit: int) -> int:
    """BLOCK_S of the merge: a power of two >= 2 covering the slices, at most 32."""
    return min(MAX_MERGE_CHUNK, max(2, triton.next_power_of_2(nsplit)))


if HAS_TRITON:

    @triton.jit
    def row_block(pid, M, BLOCK: tl.constexpr):
        """Rows [pid·BLOCK, pid·BLOCK + BLOCK) as int64 (M·S partial offsets pass 2^31) and
        which of them exist."""
        rows = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        return rows, rows < M

    @triton.jit
    def slice_bounds(split, K_PER_SPLIT, K):
        """Entries [begin, end) of slice ``split``."""
        k_begin = split * K_PER_SPLIT
        return k_begin, tl.minimum(k_begin + K_PER_SPLIT, K)

    @triton.jit
    def slice_chunk(rows, row_ok, s0, NSPLIT, BLOCK_S: tl.constexpr):
        """Slices [s0, s0 + BLOCK_S) of each row: their numbers, which exist, and their offsets
        in the row-major [M, NSPLIT] partials."""
        sp = s0 + tl.arange(0, BLOCK_S)
        ok = row_ok[:, None] & (sp < NSPLIT)[None, :]
        return sp, ok, rows[:, None] * NSPLIT + sp[None, :]

    @triton.jit
    def running_best(BLOCK: tl.constexpr, LOWEST: tl.constexpr):
        """A row block's running (best value, its index): +inf (LOWEST) or -inf, index 0."""
        if LOWEST:
            best = tl.full([BLOCK], float("inf"), tl.float32)
        else:
            best = tl.full([BLOCK], float("-inf"), tl.float32)
        return best, tl.zeros([BLOCK], tl.int32)

    @triton.jit
    def keep_better(new, new_id, best, best_id, LOWEST: tl.constexpr):
        """(better, best, best_id) after offering (new, new_id): strictly better only, so that
        an equal value found later (a higher index) keeps the earlier one."""
        if LOWEST:
            better = new < best
        else:
            better = new > best
        return better, tl.where(better, new, best), tl.where(better, new_id, best_id)

    @triton.jit
    def best_slice(values, sp, NSPLIT, LOWEST: tl.constexpr):
        """Per row, the best of a chunk's slice values (the lowest if LOWEST, else the highest)
        and the first slice holding it."""
        if LOWEST:
            best = tl.min(values, axis=1)
        else:
            best = tl.max(values, axis=1)
        return best, first_index(values, best, sp, NSPLIT)

    @triton.jit
    def first_index(values, best, index, NONE):
        """Per row, the lowest ``index`` whose value equals the row's ``best`` (NONE where none
        does): ties are broken here explicitly, never left to the order of a reduction."""
        return tl.min(tl.where(values == best[:, None], index[None, :], NONE), axis=1)


def run(launches: Sequence[tuple]) -> None:
    """Run [(kernel, grid, args, kwargs)] in order on the current stream."""
    for kernel, grid, args, kwargs in launches:
        kernel[grid](*args, **kwargs)


def compile_variants(launch_lists: Sequence[Sequence[tuple]]) -> list[tuple]:
    """[(label, kernel, args, kwargs)] of the distinct kernels in several launch lists (made with
    CUDA launch options), for the sm_80/sm_90 compile check. ``WIDEN`` (the interpreter's bf16
    workaround) is off: a GPU never takes it."""
    out, seen = [], set()
    for launches in launch_lists:
        for kernel, _grid, args, kwargs in launches:
            if "WIDEN" in kwargs:
                kwargs["WIDEN"] = False
            label = f"{kernel.fn.__name__} {kwargs}"
            if label not in seen:
                seen.add(label)
                out.append((label, kernel, args, kwargs))
    return out


def outputs(m: int, device: torch.device, dtypes: tuple[torch.dtype, torch.dtype],
            out: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The two [M] results of a scan: ``out`` if given, else new tensors of ``dtypes``."""
    if out is not None:
        return out
    return (torch.empty(m, dtype=dtypes[0], device=device),
            torch.empty(m, dtype=dtypes[1], device=device))


def scan(m: int, device: torch.device, dtypes: tuple[torch.dtype, torch.dtype],
         out: tuple[torch.Tensor, torch.Tensor] | None,
         launches: Callable[[torch.Tensor, torch.Tensor], Sequence[tuple]]):
    """Allocate (or take) the results and run ``launches(first, second)`` unless M = 0."""
    if not HAS_TRITON:  # pragma: no cover - the registry does not pick a Triton backend then
        raise RuntimeError("triton not installed (pip install xlx_fast[triton])")
    first, second = outputs(m, device, dtypes, out)
    if m:
        run(launches(first, second))
    return first, second


def register_backends(op: str, *, triton_impl: Callable, torch_impl: Callable,
                      tolerances: dict[torch.dtype, float]) -> None:
    """The two backends of a split-scan op: the Triton kernel pair (CUDA; CPU tensors under the
    interpreter when named) preferred, the blocked torch GEMM + reduction on the CPU, and on
    CUDA timed against the kernel per shape (``ops.measured``: cuBLAS's GEMM may win)."""
    register_op(op, "triton", impl=triton_impl, capability=triton_capability(dtypes=FLOAT_DTYPES),
                preference_rank=0, tolerances=tolerances)
    register_op(op, "torch", impl=torch_impl,
                capability=Capability(devices=("cpu",), on_request=("cuda",), measured_on=("cuda",),
                                      dtypes=FLOAT_DTYPES),
                preference_rank=1, tolerances=tolerances)
    measured.install(op)
