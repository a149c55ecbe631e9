// The sampler step as one CUDA kernel launch: one block of 512 threads per grid row, for rows
// of 1 to kMaxCells = 1024 cells (`cells`, the same for every row of a launch).
//
// Phase 1 (cell c on thread c mod 512, so up to two cells a thread): stage the row's
// probabilities, mask and visited flags in shared memory; check the row for NaN with the whole
// block (__syncthreads_or); then apply decide_cell() from sampler_rules.h -- the same function
// the C++ twin runs -- and write ids, mask and visited in place. Staging first is what makes the
// in-place update safe: every cell decides from the state before the step.
// Selection: Mask-Predict's "count lowest probabilities, stable" is cell_rank(c) < count, where
// each thread ranks its cells against all N cells of the row in shared memory (broadcast reads,
// no bank conflicts); AR-confidence's pick compares the same way (tlbr and random compare
// nothing). That is N^2 comparisons a row, N^2 / 512 a thread: 8 at 64 cells, 128 at 256, 2,048
// at 1,024 -- no sort, no extra synchronisation, exactly the twin's rule. Estimated (not
// measured): at 1,024 cells about 16 warps x 2,048 x ~6 instructions = 200 K warp-instructions
// a block, some tens of microseconds on one SM, the order of the gather's time at D = 768 bf16;
// at 64 cells it is noise. A block-wide bitonic sort (55 compare-exchange stages of 512 threads
// for 1,024 keys) is the way down if a profile shows it matters.
// Phase 2 (whole block): out[b, c, :] = mask_row or table[ids[c], :], a gather of N rows of
// row_bytes bytes, read and written as V (16, 8, 4, 2 or 1 byte words, the widest that the
// row size and the three base pointers allow), four words in flight per thread.
//
// Bytes moved per row: N * row_bytes read (table rows / mask_row) + N * row_bytes written,
// plus N * (4 + 8 + 8 + 1 + 1 + 1 + 1) bytes of per-cell state: the gather dominates.
// Shared memory: 14 KiB a block, static (kMaxCells * (4 + 1 + 1 + 8) bytes), whatever N is.
// Limits (checked in Python, sampler_args.py): 1 <= N <= 1024, N * row_bytes <= 2^30.
//
// This file includes nothing but sampler_rules.h, so it compiles both under nvcc (sampler_cuda.cu)
// and under NVRTC (xlx_fast/ops/sampler_backends.py's CuPy path), which instantiates the extern "C"
// entry points below by name.
#pragma once

#include "sampler_rules.h"

namespace xlx {

constexpr int kSamplerThreads = 512;  // wide enough to keep ~32 KiB in flight per SM
constexpr int kGatherUnroll = 4;
static_assert(kMaxCells <= 2 * kSamplerThreads, "phase 1 gives a thread at most two cells");

template <typename V>
__device__ __forceinline__ void sampler_step_row(
    const float* __restrict__ pred_prob, const long long* __restrict__ pred_id,
    const unsigned char* __restrict__ table, const unsigned char* __restrict__ mask_row,
    unsigned char* mask, unsigned char* visited, long long* ids, unsigned char* __restrict__ out,
    int* status, const int* count, const int* cell, const int* next_cell,
    const int* strategies, int strategy, int cells, long long n_table, long long row_bytes) {
  __shared__ float s_prob[kMaxCells];
  __shared__ unsigned char s_mask[kMaxCells];
  __shared__ unsigned char s_visited[kMaxCells];
  __shared__ const V* s_src[kMaxCells];
  __shared__ int s_first_bad;

  const long long b = blockIdx.x;
  const int tid = threadIdx.x;
  if (strategies) strategy = strategies[b];
  if (strategy == kInactive) return;  // block-uniform: an idle slot costs one load
  const long long cell0 = b * cells;
  const int row_count = count ? count[b] : 0;
  const int row_cell = cell ? cell[b] : -1;
  const int row_next = next_cell ? next_cell[b] : -1;

  int nan = 0;
  for (int c = tid; c < cells; c += kSamplerThreads) {
    const float p = pred_prob[cell0 + c];
    s_prob[c] = p;
    s_mask[c] = mask[cell0 + c];
    s_visited[c] = visited[cell0 + c];
    nan |= p != p;
  }
  if (tid == 0) s_first_bad = cells;
  // The barrier also publishes the staged row; the status is block-uniform (row_status's order:
  // a NaN first, then the per-row scalars).
  const int rs = __syncthreads_or(nan) ? kBadProb
                                       : args_status(strategy, row_count, row_cell, row_next, cells);
  if (rs != kOk) {  // nothing of this row is written but its status
    if (tid == 0 && status[b] == kOk) status[b] = rs;
    return;
  }

  for (int c = tid; c < cells; c += kSamplerThreads) {
    const CellDecision d =
        decide_cell(strategy, c, s_prob, pred_id + cell0, s_mask, s_visited, ids[cell0 + c],
                    row_count, row_cell, row_next, n_table, cells);
    ids[cell0 + c] = d.id;
    mask[cell0 + c] = d.masked ? 1 : 0;
    visited[cell0 + c] = d.visited ? 1 : 0;
    // A bad id never reaches the gather: its cell gets mask_row and the row is flagged.
    const unsigned char* src = (d.masked || d.bad_id) ? mask_row : table + d.id * row_bytes;
    s_src[c] = reinterpret_cast<const V*>(src);
    if (d.bad_id) atomicMin(&s_first_bad, c);
  }
  __syncthreads();

  const int words = static_cast<int>(row_bytes / static_cast<long long>(sizeof(V)));
  const int total = cells * words;  // <= 2^30: row_bytes * cells is bounded in Python
  V* dst = reinterpret_cast<V*>(out + cell0 * row_bytes);
  for (int base = tid; base < total; base += kGatherUnroll * kSamplerThreads) {
    V v[kGatherUnroll];
#pragma unroll
    for (int u = 0; u < kGatherUnroll; ++u) {
      const int t = base + u * kSamplerThreads;
      if (t < total) {
        const int c = t / words;
        v[u] = s_src[c][t - c * words];
      }
    }
#pragma unroll
    for (int u = 0; u < kGatherUnroll; ++u) {
      const int t = base + u * kSamplerThreads;
      if (t < total) dst[t] = v[u];
    }
  }
  if (tid == 0 && s_first_bad < cells && status[b] == kOk) status[b] = kBadIdBase + s_first_bad;
}

}  // namespace xlx

// Entry points by word width. Pointers are untyped bytes where only bytes matter (the gather is
// a copy, so one kernel serves fp32, fp16 and bf16 tables alike).
#define XLX_SAMPLER_ENTRY(NAME, V)                                                              \
  extern "C" __global__ void __launch_bounds__(xlx::kSamplerThreads) NAME(                      \
      const float* pred_prob, const long long* pred_id, const unsigned char* table,             \
      const unsigned char* mask_row, unsigned char* mask, unsigned char* visited,               \
      long long* ids, unsigned char* out, int* status, const int* count, const int* cell,       \
      const int* next_cell, const int* strategies, int strategy, int cells, long long n_table, \
      long long row_bytes) {                                                                    \
    xlx::sampler_step_row<V>(pred_prob, pred_id, table, mask_row, mask, visited, ids, out,      \
                             status, count, cell, next_cell, strategies, strategy, cells,       \
                             n_table, row_bytes);                                               \
  }

XLX_SAMPLER_ENTRY(xlx_sampler_step_w16, uint4)
XLX_SAMPLER_ENTRY(xlx_sampler_step_w8, uint2)
XLX_SAMPLER_ENTRY(xlx_sampler_step_w4, unsigned int)
XLX_SAMPLER_ENTRY(xlx_sampler_step_w2, unsigned short)
XLX_SAMPLER_ENTRY(xlx_sampler_step_w1, unsigned char)

#undef XLX_SAMPLER_ENTRY
