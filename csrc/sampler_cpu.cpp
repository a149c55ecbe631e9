// The C++ twin of the sampler-step kernel: the same decide_cell() per cell, a memcpy per cell.
// A row of N cells costs N^2 comparisons for mask_predict and confidence (see sampler_rules.h).
#include <cstring>
#include <vector>

#include "sampler_rules.h"
#include "sampler_step.h"

namespace xlx {

namespace {

int row_strategy(const SamplerStepArgs& a, int64_t b) {
  return a.strategies ? a.strategies[b] : a.strategy;
}

// Decides the cells of row b from the state before the step; returns the row's status.
int decide_row(const SamplerStepArgs& a, int64_t b, CellDecision* d) {
  const int strategy = row_strategy(a, b);
  if (strategy == kInactive) return kOk;
  const int cells = static_cast<int>(a.cells);
  const int64_t cell0 = b * a.cells;
  const float* prob = a.pred_prob + cell0;
  const int count = a.count ? a.count[b] : 0;
  const int cell = a.cell ? a.cell[b] : -1;
  const int next_cell = a.next_cell ? a.next_cell[b] : -1;
  const int rs = row_status(strategy, count, cell, next_cell, prob, cells);
  if (rs != kOk) return rs;
  const auto* pred_id = reinterpret_cast<const long long*>(a.pred_id + cell0);
  for (int c = 0; c < cells; ++c) {
    d[c] = decide_cell(strategy, c, prob, pred_id, a.mask + cell0, a.visited + cell0,
                       static_cast<long long>(a.ids[cell0 + c]), count, cell, next_cell,
                       a.n_table, cells);
  }
  for (int c = 0; c < cells; ++c)
    if (d[c].bad_id) return kBadIdBase + c;
  return kOk;
}

}  // namespace

int64_t sampler_step_cpu(const SamplerStepArgs& a, int* first_code) {
  std::vector<CellDecision> decisions(static_cast<size_t>(a.batch * a.cells));
  int64_t first_bad = -1;
  for (int64_t b = 0; b < a.batch; ++b) {
    const int rs = decide_row(a, b, &decisions[b * a.cells]);
    if (rs != kOk) {
      if (a.status[b] == kOk) a.status[b] = rs;
      if (first_bad < 0) {
        first_bad = b;
        *first_code = rs;
      }
    }
  }
  if (first_bad >= 0) return first_bad;

  for (int64_t b = 0; b < a.batch; ++b) {
    if (row_strategy(a, b) == kInactive) continue;
    const CellDecision* d = &decisions[b * a.cells];
    const int64_t cell0 = b * a.cells;
    for (int64_t c = 0; c < a.cells; ++c) {
      a.ids[cell0 + c] = d[c].id;
      a.mask[cell0 + c] = d[c].masked ? 1 : 0;
      a.visited[cell0 + c] = d[c].visited ? 1 : 0;
      const uint8_t* src = d[c].masked ? a.mask_row : a.table + d[c].id * a.row_bytes;
      std::memcpy(a.out + (cell0 + c) * a.row_bytes, src, static_cast<size_t>(a.row_bytes));
    }
  }
  return -1;
}

}  // namespace xlx
