// The Mask-Predict sampler step's selection rules, for one cell of one grid row.
//
// This header is the single statement of the rules: the C++ twin (sampler_cpu.cpp) calls
// decide_cell() in a loop over the 64 cells, the CUDA kernel (sampler_kernel.cuh) calls it with
// one thread per cell. It includes nothing, so NVRTC (CuPy's JIT) compiles it as is.
//
// Rules for one row, step i, 64 cells (see xlx_fast/ops/sampler_step.py for the full contract):
//   decided D:   mask_predict -> cells masked in m_i
//                tlbr, random -> {cell}            (cell == -1: nothing)
//                confidence   -> {argmax of pred_prob over cells not visited}, ties -> lowest index
//   ids[c] = pred_id[c] and visited[c] = 1 for c in D
//   m_{i+1}:     mask_predict -> rank(c) < count, rank = position in a stable ascending sort of
//                                pred_prob over all 64 cells (ties -> lowest index first)
//                tlbr, confidence -> m_i minus D
//                random       -> (m_i minus D) plus {next_cell}   (next_cell == -1: none)
//   out[c] = mask_row if m_{i+1}[c] else table[ids[c]]
// A row whose strategy is kInactive (an idle slot of a padded batch) is not touched at all: no
// check, no write, no gather -- it costs one load of its strategy code.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define XLX_HD __host__ __device__ __forceinline__
#else
#define XLX_HD inline
#endif

namespace xlx {

constexpr int kCells = 64;  // 8 x 8 grid

// Strategy codes; xlx_fast/strategies.py mirrors them (tests/test_strategies.py compares).
// kInactive is valid only as a per-row code (SamplerStepArgs::strategies): the row is skipped.
enum Strategy : int { kMaskPredict = 0, kTlbr = 1, kRandom = 2, kConfidence = 3, kInactive = 4 };

// Per-row status codes. 0 is "fine"; codes are sticky (a kernel never clears a non-zero one).
//   1..64          an id that must be used is outside [0, N): at cell (code - 1), lowest such cell
//   kBadCount      count outside [0, 64]           (mask_predict)
//   kBadCell       cell outside [-1, 64)           (tlbr, random)
//   kBadNextCell   next_cell outside [-1, 64)      (random)
//   kBadProb       a pred_prob of the row is NaN
//   kBadStrategy   unknown strategy code
enum Status : int {
  kOk = 0,
  kBadIdBase = 1,
  kBadCount = 65,
  kBadCell = 66,
  kBadNextCell = 67,
  kBadProb = 68,
  kBadStrategy = 69,
};

// "a is a less confident cell than b": the stable ascending order of (probability, index).
XLX_HD bool less_confident(float pa, int a, float pb, int b) {
  return pa < pb || (pa == pb && a < b);
}

// Position of cell c in the stable ascending sort of the row's probabilities: the number of
// cells j with p_j < p_c, or p_j == p_c and j < c. Mask-Predict masks cell c iff rank < count.
XLX_HD int cell_rank(const float* prob, int c) {
  const float pc = prob[c];
  int rank = 0;
  for (int j = 0; j < kCells; ++j) rank += less_confident(prob[j], j, pc, c) ? 1 : 0;
  return rank;
}

// Whether c is the most confident cell not yet visited (ties -> lowest index): no other
// unvisited cell j beats it, i.e. none with (p_c, c) < (p_j, j) in the order above.
XLX_HD bool is_confidence_pick(const float* prob, const unsigned char* visited, int c) {
  if (visited[c]) return false;
  const float pc = prob[c];
  for (int j = 0; j < kCells; ++j) {
    if (j == c || visited[j]) continue;
    // j beats c when it has a higher probability, or the same one and a lower index.
    if (pc < prob[j] || (pc == prob[j] && j < c)) return false;
  }
  return true;
}

// A row-level argument error (or kOk). The same for every cell of the row.
XLX_HD int row_status(int strategy, int count, int cell, int next_cell, const float* prob) {
  for (int j = 0; j < kCells; ++j)
    if (prob[j] != prob[j]) return kBadProb;  // NaN: the order above is not total
  switch (strategy) {
    case kMaskPredict:
      return (count < 0 || count > kCells) ? kBadCount : kOk;
    case kTlbr:
      return (cell < -1 || cell >= kCells) ? kBadCell : kOk;
    case kConfidence:
      return kOk;
    case kRandom:
      if (cell < -1 || cell >= kCells) return kBadCell;
      if (next_cell < -1 || next_cell >= kCells) return kBadNextCell;
      return kOk;
    default:
      return kBadStrategy;
  }
}

struct CellDecision {
  long long id;        // ids[c] after the step
  bool masked;         // m_{i+1}[c]
  bool visited;        // visited[c] after the step
  bool bad_id;         // an id that this step uses (written or gathered) is outside [0, N)
};

// Everything the step does to cell c of one row. The row arrays hold the state BEFORE the step
// (the caller must not let another cell's update be seen here: the kernel stages them in
// shared memory, the twin decides all cells before writing). Valid only if row_status == kOk.
XLX_HD CellDecision decide_cell(int strategy, int c, const float* prob, const long long* pred_id,
                                const unsigned char* mask, const unsigned char* visited,
                                long long id_before, int count, int cell, int next_cell,
                                long long n_table) {
  bool decided;
  switch (strategy) {
    case kMaskPredict: decided = mask[c] != 0; break;
    case kConfidence: decided = is_confidence_pick(prob, visited, c); break;
    default: decided = (c == cell); break;  // tlbr, random
  }
  bool masked;
  if (strategy == kMaskPredict) {
    masked = cell_rank(prob, c) < count;
  } else {
    masked = mask[c] != 0 && !decided;
    if (strategy == kRandom && c == next_cell) masked = true;
  }
  CellDecision d;
  d.id = decided ? pred_id[c] : id_before;
  d.masked = masked;
  d.visited = visited[c] != 0 || decided;
  const bool id_ok = d.id >= 0 && d.id < n_table;
  d.bad_id = (decided || !masked) && !id_ok;
  return d;
}

}  // namespace xlx
