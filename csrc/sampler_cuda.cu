// Host side of the CUDA sampler step: picks the widest word the gather can use and launches.
#include <cuda_runtime.h>

#include <string>

#include "sampler_kernel.cuh"
#include "sampler_step.h"

namespace xlx {

namespace {

// The widest word (16, 8, 4, 2, 1 bytes) dividing the row size and all three row base pointers.
int gather_width(const SamplerStepArgs& a) {
  const uintptr_t bits = static_cast<uintptr_t>(a.row_bytes) |
                         reinterpret_cast<uintptr_t>(a.table) |
                         reinterpret_cast<uintptr_t>(a.mask_row) |
                         reinterpret_cast<uintptr_t>(a.out);
  for (int w = 16; w > 1; w /= 2)
    if ((bits & static_cast<uintptr_t>(w - 1)) == 0) return w;
  return 1;
}

}  // namespace

bool cuda_compiled() { return true; }

std::string cuda_archs() { return XLX_CUDA_ARCHS_STRING; }

std::string cuda_runtime_version() {
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
}

int cuda_device_count(std::string* reason) {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    *reason = std::string(cudaGetErrorName(err)) + " (error " + std::to_string(int(err)) +
              "): " + cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky error so later calls start clean
    return -1;
  }
  if (n == 0) *reason = "the CUDA driver reports no device";
  return n;
}

std::string sampler_step_cuda(const SamplerStepArgs& a, uintptr_t stream) {
  if (a.batch == 0) return "";
  if (a.cells < 1 || a.cells > kMaxCells)
    return "cells = " + std::to_string(a.cells) + " is outside 1.." + std::to_string(kMaxCells);
  const dim3 grid(static_cast<unsigned>(a.batch));
  const dim3 block(kSamplerThreads);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const auto* table = a.table;
  const auto* pred_id = reinterpret_cast<const long long*>(a.pred_id);
  auto* ids = reinterpret_cast<long long*>(a.ids);
#define XLX_LAUNCH(NAME)                                                                    \
  NAME<<<grid, block, 0, s>>>(a.pred_prob, pred_id, table, a.mask_row, a.mask, a.visited, \
                              ids, a.out, a.status, a.count, a.cell, a.next_cell,         \
                              a.strategies, a.strategy, static_cast<int>(a.cells),        \
                              a.n_table, a.row_bytes)
  switch (gather_width(a)) {
    case 16: XLX_LAUNCH(xlx_sampler_step_w16); break;
    case 8: XLX_LAUNCH(xlx_sampler_step_w8); break;
    case 4: XLX_LAUNCH(xlx_sampler_step_w4); break;
    case 2: XLX_LAUNCH(xlx_sampler_step_w2); break;
    default: XLX_LAUNCH(xlx_sampler_step_w1); break;
  }
#undef XLX_LAUNCH
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  return "";
}

}  // namespace xlx
