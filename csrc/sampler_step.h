// Host entry points of the sampler step, in plain C++ types so that bindings.cpp compiles
// without CUDA headers. Pointers are raw device or host addresses handed over from Python after
// it has validated dtype, device, shape and contiguity (xlx_fast/ops/sampler_args.py, whose
// SamplerStepArgs lists the pointers in this struct's order).
#pragma once

#include <cstdint>
#include <string>

namespace xlx {

// Arguments of one step; count/cell/next_cell may be null when the strategy ignores them
// (with per-row strategies, pass every array a row's strategy may read).
// A row has `cells` cells (1..kMaxCells = 1024, sampler_rules.h): pred_prob, pred_id, mask,
// visited, ids are [batch, cells] contiguous, out is [batch, cells, row_bytes] contiguous, table
// is [n_table, row_bytes], mask_row [row_bytes]; cells * row_bytes is at most 2^30 (the CUDA
// kernel indexes a row's words with 32-bit ints).
struct SamplerStepArgs {
  const float* pred_prob;
  const int64_t* pred_id;
  const uint8_t* table;
  const uint8_t* mask_row;
  uint8_t* mask;
  uint8_t* visited;
  int64_t* ids;
  uint8_t* out;
  int32_t* status;
  const int32_t* count;
  const int32_t* cell;
  const int32_t* next_cell;
  // Per-row strategy codes [batch] (null: every row uses `strategy`). kInactive skips a row.
  const int32_t* strategies;
  int strategy;
  int64_t batch;
  int64_t cells;
  int64_t n_table;
  int64_t row_bytes;
};

// The C++ twin. Decides every row first; if any row has a non-zero status, writes only the
// status of those rows (sticky) and returns the first such row with its code in *first_code,
// else applies the step to every row and returns -1. So bad input leaves ids, mask, visited and
// out untouched on the CPU.
int64_t sampler_step_cpu(const SamplerStepArgs& a, int* first_code);

// True when this build holds the CUDA kernels.
bool cuda_compiled();
// CUDA architectures compiled in (e.g. "80;90"), empty without CUDA.
std::string cuda_archs();
// CUDA runtime version the module was built against (e.g. "13.0"), empty without CUDA.
std::string cuda_runtime_version();
// Number of CUDA devices; on failure -1 and `reason` says why (e.g. no driver).
int cuda_device_count(std::string* reason);
// Enqueues the kernel on `stream` (a cudaStream_t as an integer; 0 = legacy default stream).
// No allocation, no synchronisation: capturable in a CUDA graph. Returns "" or the launch error.
std::string sampler_step_cuda(const SamplerStepArgs& a, uintptr_t stream);

}  // namespace xlx
