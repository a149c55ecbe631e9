// The Mask-Predict sampler step's selection rules, for one cell of one grid row.
//
// This header is the single statement of the rules: the C++ twin (sampler_cpu.cpp) calls
// decide_cell() in a loop over a row's cells, the CUDA kernel (sampler_kernel.cuh) calls it from
// one thread per cell (two cells a thread past 512). It includes nothing, so NVRTC (CuPy's JIT)
// compiles it as is.
//
// A row has `cells` cells, 1 <= cells <= kMaxCells, a runtime property of the call (64 for the
// 8x8 grid, 256 for 16x16, 1024 for 32x32). Rules for one row, step i (see
// xlx_fast/ops/sampler_step.py for the full contract):
//   decided D:   mask_predict -> cells masked in m_i
//                tlbr, random -> {cell}            (cell == -1: nothing)
//                confidence   -> {argmax of pred_prob over cells not visited}, ties -> lowest index
//   ids[c] = pred_id[c] and visited[c] = 1 for c in D
//   m_{i+1}:     mask_predict -> rank(c) < count, rank = position in a stable ascending sort of
//                                pred_prob over all the row's cells (ties -> lowest index first)
//                tlbr, confidence -> m_i minus D
//                random       -> (m_i minus D) plus {next_cell}   (next_cell == -1: none)
//   out[c] = mask_row if m_{i+1}[c] else table[ids[c]]
// A row whose strategy is kInactive (an idle slot of a padded batch) is not touched at all: no
// check, no write, no gather -- it costs one load of its strategy code.
//
// Cost: cell_rank (mask_predict) and is_confidence_pick (confidence) compare one cell with every
// cell of its row, so such a row costs cells^2 comparisons (4 Ki at 64 cells, 1 Mi at 1024); tlbr
// and random cost O(1) a cell. No sort, no scratch memory, and every cell's answer is independent
// of the order in which cells are decided.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define XLX_HD __host__ __device__ __forceinline__
#else
#define XLX_HD inline
#endif

namespace xlx {

constexpr int kMaxCells = 1024;  // 32 x 32: the most cells a row may have (one CUDA block)

// Strategy codes; xlx_fast/strategies.py mirrors them (tests/test_strategies.py compares).
// kInactive is valid only as a per-row code (SamplerStepArgs::strategies): the row is skipped.
enum Strategy : int { kMaskPredict = 0, kTlbr = 1, kRandom = 2, kConfidence = 3, kInactive = 4 };

// Per-row status codes. 0 is "fine"; codes are sticky (a kernel never clears a non-zero one).
//   kBadCount      count outside [0, cells]        (mask_predict)
//   kBadCell       cell outside [-1, cells)        (tlbr, random)
//   kBadNextCell   next_cell outside [-1, cells)   (random)
//   kBadProb       a pred_prob of the row is NaN
//   kBadStrategy   unknown strategy code
//   kBadIdBase + c an id that must be used is outside [0, n_table): at cell c, the lowest such
//                  cell (0 <= c < cells <= kMaxCells, so these codes never meet the ones above)
// xlx_fast/ops/sampler_args.py mirrors these values (tests/test_sampler_step.py compares).
enum Status : int {
  kOk = 0,
  kBadCount = 1,
  kBadCell = 2,
  kBadNextCell = 3,
  kBadProb = 4,
  kBadStrategy = 5,
  kBadIdBase = 1 << 16,
};
static_assert(kMaxCells < (1 << 16), "bad-id status codes must stay apart from the fixed codes");

// "a is a less confident cell than b": the stable ascending order of (probability, index).
XLX_HD bool less_confident(float pa, int a, float pb, int b) {
  return pa < pb || (pa == pb && a < b);
}

// Position of cell c in the stable ascending sort of the row's probabilities: the number of
// cells j with p_j < p_c, or p_j == p_c and j < c. Mask-Predict masks cell c iff rank < count.
XLX_HD int cell_rank(const float* prob, int c, int cells) {
  const float pc = prob[c];
  int rank = 0;
  for (int j = 0; j < cells; ++j) rank += less_confident(prob[j], j, pc, c) ? 1 : 0;
  return rank;
}

// Whether c is the most confident cell not yet visited (ties -> lowest index): no other
// unvisited cell j beats it, i.e. none with (p_c, c) < (p_j, j) in the order above.
XLX_HD bool is_confidence_pick(const float* prob, const unsigned char* visited, int c,
                               int cells) {
  if (visited[c]) return false;
  const float pc = prob[c];
  for (int j = 0; j < cells; ++j) {
    if (j == c || visited[j]) continue;
    // j beats c when it has a higher probability, or the same one and a lower index.
    if (pc < prob[j] || (pc == prob[j] && j < c)) return false;
  }
  return true;
}

// The row-level status of the per-row scalars (or kOk), for a row of `cells` cells.
XLX_HD int args_status(int strategy, int count, int cell, int next_cell, int cells) {
  switch (strategy) {
    case kMaskPredict:
      return (count < 0 || count > cells) ? kBadCount : kOk;
    case kTlbr:
      return (cell < -1 || cell >= cells) ? kBadCell : kOk;
    case kConfidence:
      return kOk;
    case kRandom:
      if (cell < -1 || cell >= cells) return kBadCell;
      if (next_cell < -1 || next_cell >= cells) return kBadNextCell;
      return kOk;
    default:
      return kBadStrategy;
  }
}

// A row-level argument error (or kOk). The same for every cell of the row. A NaN in pred_prob
// comes first (the order above is not total then); the kernel checks it with the whole block and
// then calls args_status, which gives the same answer.
XLX_HD int row_status(int strategy, int count, int cell, int next_cell, const float* prob,
                      int cells) {
  for (int j = 0; j < cells; ++j)
    if (prob[j] != prob[j]) return kBadProb;
  return args_status(strategy, count, cell, next_cell, cells);
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
                                long long n_table, int cells) {
  bool decided;
  switch (strategy) {
    case kMaskPredict: decided = mask[c] != 0; break;
    case kConfidence: decided = is_confidence_pick(prob, visited, c, cells); break;
    default: decided = (c == cell); break;  // tlbr, random
  }
  bool masked;
  if (strategy == kMaskPredict) {
    masked = cell_rank(prob, c, cells) < count;
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
