// The seam between libgemma3 and its CUDA backend (docs/cuda.md, "The CUDA module").
//
// With the CUDA toolkit, the backend (src/backend/cuda/, kernels/) is built as a module,
// libgemma3-cuda.so, that libgemma3 loads with dlopen the first time a CUDA backend is asked
// for (as ggml's dynamic backends): a program that links libgemma3 needs no CUDA toolkit to
// build, and loads no CUDA library unless it uses the GPU. The module exports one C symbol,
// gemma3_cuda_module(), returning this table; everything else in it is local (its own copies of
// the core code it uses: dtypes, quant blocks, Status, the reference sampler). Objects cross
// the seam as C++ types of this source tree, so libgemma3 accepts only a module of its own
// version and ABI number. The module is never unloaded: backends made by it may live until exit.
//
// Where the backend is linked into the program instead (the CUDA emulator build; the test and
// benchmark binaries, which call the kernels directly), that definition of gemma3_cuda_module()
// is used and nothing is loaded (src/backend/backend_registry.cpp).
#pragma once

#include <memory>

#include "backend/backend.h"

namespace gemma3 {

// Bump when BackendOptions, Backend, BackendWeight or this table change layout or meaning.
constexpr int kCudaModuleAbi = 1;

struct CudaModuleApi {
  int abi;              // kCudaModuleAbi of the module's build
  const char* version;  // GEMMA3_VERSION of the module's build
  Result<std::unique_ptr<Backend>> (*create)(const BackendOptions& options);
  bool (*available)();            // at least one device visible
  Status (*status)(Backend& be);  // cuda_backend_status for a backend it made; ok otherwise
};

}  // namespace gemma3

extern "C" const gemma3::CudaModuleApi* gemma3_cuda_module();
