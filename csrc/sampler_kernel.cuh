// The sampler step as one CUDA kernel launch: one block per grid row.
//
// Phase 1 (64 threads, one per cell): stage the row's probabilities, mask and visited flags in
// shared memory, then apply decide_cell() from sampler_rules.h -- the same function the C++
// twin runs -- and write ids, mask and visited in place. Staging first is what makes the in-place
// update safe: every cell decides from the state before the step.
// Phase 2 (whole block): out[b, c, :] = mask_row or table[ids[c], :], a gather of 64 rows of
// row_bytes bytes, read and written as V (16, 8, 4, 2 or 1 byte words, the widest that the
// row size and the three base pointers allow), four words in flight per thread.
//
// Bytes moved per row: 64 * row_bytes read (table rows / mask_row) + 64 * row_bytes written,
// plus 64 * (4 + 8 + 8 + 1 + 1 + 1 + 1) bytes of per-cell state: the gather dominates.
//
// This file includes nothing but sampler_rules.h, so it compiles both under nvcc (sampler_cuda.cu)
// and under NVRTC (xlx_fast/ops/sampler_backends.py's CuPy path), which instantiates the extern "C"
// entry points below by name.
#pragma once

#include "sampler_rules.h"

namespace xlx {

constexpr int kSamplerThreads = 512;  // >= kCells; wide enough to keep ~32 KiB in flight per SM
constexpr int kGatherUnroll = 4;

template <typename V>
__device__ __forceinline__ void sampler_step_row(
    const float* __restrict__ pred_prob, const long long* __restrict__ pred_id,
    const unsigned char* __restrict__ table, const unsigned char* __restrict__ mask_row,
    unsigned char* mask, unsigned char* visited, long long* ids, unsigned char* __restrict__ out,
    int* status, const int* count, const int* cell, const int* next_cell,
    const int* strategies, int strategy, long long n_table, long long row_bytes) {
  __shared__ float s_prob[kCells];
  __shared__ unsigned char s_mask[kCells];
  __shared__ unsigned char s_visited[kCells];
  __shared__ const V* s_src[kCells];
  __shared__ int s_row_status;
  __shared__ int s_first_bad;

  const long long b = blockIdx.x;
  const int tid = threadIdx.x;
  if (strategies) strategy = strategies[b];
  if (strategy == kInactive) return;  // block-uniform: an idle slot costs one load
  const long long cell0 = b * kCells;
  const int row_count = count ? count[b] : 0;
  const int row_cell = cell ? cell[b] : -1;
  const int row_next = next_cell ? next_cell[b] : -1;

  if (tid < kCells) {
    s_prob[tid] = pred_prob[cell0 + tid];
    s_mask[tid] = mask[cell0 + tid];
    s_visited[tid] = visited[cell0 + tid];
  }
  if (tid == 0) s_first_bad = kCells;
  __syncthreads();
  if (tid == 0) s_row_status = row_status(strategy, row_count, row_cell, row_next, s_prob);
  __syncthreads();
  if (s_row_status != kOk) {  // block-uniform: nothing of this row is written but its status
    if (tid == 0 && status[b] == kOk) status[b] = s_row_status;
    return;
  }

  if (tid < kCells) {
    const CellDecision d =
        decide_cell(strategy, tid, s_prob, pred_id + cell0, s_mask, s_visited, ids[cell0 + tid],
                    row_count, row_cell, row_next, n_table);
    ids[cell0 + tid] = d.id;
    mask[cell0 + tid] = d.masked ? 1 : 0;
    visited[cell0 + tid] = d.visited ? 1 : 0;
    // A bad id never reaches the gather: its cell gets mask_row and the row is flagged.
    const unsigned char* src = (d.masked || d.bad_id) ? mask_row : table + d.id * row_bytes;
    s_src[tid] = reinterpret_cast<const V*>(src);
    if (d.bad_id) atomicMin(&s_first_bad, tid);
  }
  __syncthreads();

  const int words = static_cast<int>(row_bytes / static_cast<long long>(sizeof(V)));
  const int total = kCells * words;
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
  if (tid == 0 && s_first_bad < kCells && status[b] == kOk) status[b] = kBadIdBase + s_first_bad;
}

}  // namespace xlx

// Entry points by word width. Pointers are untyped bytes where only bytes matter (the gather is
// a copy, so one kernel serves fp32, fp16 and bf16 tables alike).
#define XLX_SAMPLER_ENTRY(NAME, V)                                                              \
  extern "C" __global__ void __launch_bounds__(xlx::kSamplerThreads) NAME(                      \
      const float* pred_prob, const long long* pred_id, const unsigned char* table,             \
      const unsigned char* mask_row, unsigned char* mask, unsigned char* visited,               \
      long long* ids, unsigned char* out, int* status, const int* count, const int* cell,       \
      const int* next_cell, const int* strategies, int strategy, long long n_table,            \
      long long row_bytes) {                                                                    \
    xlx::sampler_step_row<V>(pred_prob, pred_id, table, mask_row, mask, visited, ids, out,      \
                             status, count, cell, next_cell, strategies, strategy, n_table,     \
                             row_bytes);                                                        \
  }

XLX_SAMPLER_ENTRY(xlx_sampler_step_w16, uint4)
XLX_SAMPLER_ENTRY(xlx_sampler_step_w8, uint2)
XLX_SAMPLER_ENTRY(xlx_sampler_step_w4, unsigned int)
XLX_SAMPLER_ENTRY(xlx_sampler_step_w2, unsigned short)
XLX_SAMPLER_ENTRY(xlx_sampler_step_w1, unsigned char)

#undef XLX_SAMPLER_ENTRY
