// Backend entry points that must exist in every build. With CUDA they are defined in
// src/backend/cuda/cuda_backend.cpp; without it, here, saying so.
#include "backend/backend.h"

namespace gemma3 {

#ifndef GEMMA3_WITH_CUDA
Result<std::unique_ptr<Backend>> make_cuda_backend(const BackendOptions&) {
  return unsupported(
      "this build of gemma3 has no CUDA backend (configure with -DGEMMA3_CUDA=ON); use --backend cpu");
}
bool cuda_backend_available() { return false; }
Status cuda_backend_status(Backend&) { return ok_status(); }
#endif

}  // namespace gemma3
