// The CPU backends: the reference (plain loops; the oracle every fast kernel is tested
// against) and the fast one (quantized-activation kernels picked at run time from the CPU's
// features, a spinning worker pool, GQA-aware attention).
//
// make_cpu_backend() (backend.h) builds the fast backend unless the environment variable
// GEMMA3_CPU_KERNELS says otherwise: "ref" (reference backend), "portable", "avx2", "auto".
#pragma once

#include <memory>
#include <string>

#include "backend/backend.h"

namespace gemma3 {

Result<std::unique_ptr<Backend>> make_cpu_ref_backend(int threads);
// kernels: "auto" (best for this CPU), "portable", "avx2"; an error if it cannot run here.
Result<std::unique_ptr<Backend>> make_cpu_fast_backend(int threads, const std::string& kernels);
// "ref" or one of make_cpu_fast_backend's names.
Result<std::unique_ptr<Backend>> make_cpu_backend_named(int threads, const std::string& kernels);

}  // namespace gemma3
