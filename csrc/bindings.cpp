// xlx_fast._C: the native kernels, called from Python with raw pointers and sizes.
//
// The module does not link libtorch: xlx_fast/ops/*.py validate tensors (dtype, device, shape,
// contiguity) and pass tensor.data_ptr() values, sizes and the current CUDA stream as integers.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "first_match.h"
#include "sampler_step.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

xlx::SamplerStepArgs make_args(uintptr_t pred_prob, uintptr_t pred_id, uintptr_t table,
                               uintptr_t mask_row, uintptr_t mask, uintptr_t visited,
                               uintptr_t ids, uintptr_t out, uintptr_t status, uintptr_t count,
                               uintptr_t cell, uintptr_t next_cell, uintptr_t strategies,
                               int strategy, int64_t batch, int64_t cells,
                               int64_t n_table, int64_t row_bytes) {
  return xlx::SamplerStepArgs{ptr<const float>(pred_prob), ptr<const int64_t>(pred_id),
                              ptr<const uint8_t>(table),   ptr<const uint8_t>(mask_row),
                              ptr<uint8_t>(mask),          ptr<uint8_t>(visited),
                              ptr<int64_t>(ids),           ptr<uint8_t>(out),
                              ptr<int32_t>(status),        ptr<const int32_t>(count),
                              ptr<const int32_t>(cell),    ptr<const int32_t>(next_cell),
                              ptr<const int32_t>(strategies), strategy,
                              batch,                       cells,
                              n_table,                     row_bytes};
}

py::dict build_info() {
  py::dict d;
  d["cpu_kernels"] = true;
  d["cuda_kernels"] = xlx::cuda_compiled();
  d["cuda_archs"] = xlx::cuda_archs();
  d["cuda_runtime"] = xlx::cuda_runtime_version();
  d["cuda_runtime_linkage"] = xlx::cuda_compiled() ? "static" : "";
  d["compiler"] = std::string(
#if defined(__clang__)
      "clang " __clang_version__
#elif defined(__GNUC__)
      "gcc " __VERSION__
#else
      "unknown"
#endif
  );
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "xlx_fast native kernels (C++ CPU twins, CUDA kernels when built with nvcc)";
  m.def("build_info", &build_info, "What this module was built with.");
  m.def(
      "cuda_device_count",
      []() {
        std::string reason;
        const int n = xlx::cuda_device_count(&reason);
        return py::make_tuple(n, reason);
      },
      "(count, reason): count is -1 when the CUDA runtime cannot answer, and reason says why.");

  m.def(
      "sampler_step_cpu",
      [](uintptr_t pred_prob, uintptr_t pred_id, uintptr_t table, uintptr_t mask_row,
         uintptr_t mask, uintptr_t visited, uintptr_t ids, uintptr_t out, uintptr_t status,
         uintptr_t count, uintptr_t cell, uintptr_t next_cell, uintptr_t strategies, int strategy,
         int64_t batch, int64_t cells, int64_t n_table, int64_t row_bytes) {
        const auto a = make_args(pred_prob, pred_id, table, mask_row, mask, visited, ids, out,
                                 status, count, cell, next_cell, strategies, strategy, batch,
                                 cells, n_table, row_bytes);
        int code = 0;
        int64_t row;
        {
          py::gil_scoped_release release;
          row = xlx::sampler_step_cpu(a, &code);
        }
        return py::make_tuple(row, code);
      },
      "C++ twin of the sampler step on host pointers; returns (-1, 0), or (row, status code) of "
      "the first bad row (then nothing but status was written).");

  m.def(
      "first_match_cpu",
      [](uintptr_t x, int64_t rows, int64_t cols, int64_t stride, uintptr_t values,
         uintptr_t ids) {
        py::gil_scoped_release release;
        xlx::first_match_cpu(ptr<const float>(x), rows, cols, stride, ptr<const float>(values),
                             ptr<int64_t>(ids));
      },
      "ids[r] = the first column of row r of the float32 matrix x equal to values[r] (-1: "
      "none, or values[r] is NaN); host pointers, rows `stride` floats apart.");

  m.def(
      "sampler_step_cuda",
      [](uintptr_t pred_prob, uintptr_t pred_id, uintptr_t table, uintptr_t mask_row,
         uintptr_t mask, uintptr_t visited, uintptr_t ids, uintptr_t out, uintptr_t status,
         uintptr_t count, uintptr_t cell, uintptr_t next_cell, uintptr_t strategies, int strategy,
         int64_t batch, int64_t cells, int64_t n_table, int64_t row_bytes, uintptr_t stream) {
        const auto a = make_args(pred_prob, pred_id, table, mask_row, mask, visited, ids, out,
                                 status, count, cell, next_cell, strategies, strategy, batch,
                                 cells, n_table, row_bytes);
        const std::string err = xlx::sampler_step_cuda(a, stream);
        if (!err.empty()) throw std::runtime_error("sampler_step CUDA launch failed: " + err);
      },
      "Enqueue the CUDA sampler step on `stream` (device pointers); no sync, no allocation.");
}
