// Stand-ins for the CUDA entry points in a build without nvcc: say so instead of failing to link.
#include "sampler_step.h"

namespace xlx {

bool cuda_compiled() { return false; }
std::string cuda_archs() { return ""; }
std::string cuda_runtime_version() { return ""; }

int cuda_device_count(std::string* reason) {
  *reason = "xlx_fast._C was built without CUDA (no nvcc found, or XLX_NO_CUDA set)";
  return -1;
}

std::string sampler_step_cuda(const SamplerStepArgs&, uintptr_t) {
  return "xlx_fast._C was built without CUDA kernels";
}

}  // namespace xlx
