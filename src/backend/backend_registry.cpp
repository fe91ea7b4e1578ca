// Backend entry points that must exist in every build (with CUDA the factory functions are
// defined in src/backend/cuda/cuda_backend.cpp; without it, here, saying so), and the default
// of Backend::sample.
#include "backend/backend.h"
#include "backend/sampler.h"

namespace gemma3 {

int32_t Backend::sample(const float* logits, int n_allowed, const SamplingOptions& options,
                        const std::vector<int32_t>& banned, const std::vector<int32_t>& history,
                        std::mt19937_64& rng) {
  std::vector<float> host(static_cast<size_t>(n_allowed));
  to_host(logits, host.data(), host.size() * sizeof(float));
  SamplingOptions o = options;
  o.seed = rng();
  return Sampler(o, n_allowed, banned).sample(host.data(), history);
}

#ifndef GEMMA3_WITH_CUDA
Result<std::unique_ptr<Backend>> make_cuda_backend(const BackendOptions&) {
  return unsupported(
      "this build of gemma3 has no CUDA backend (configure with -DGEMMA3_CUDA=ON); use BackendKind::kCpu");
}
bool cuda_backend_available() { return false; }
Status cuda_backend_status(Backend&) { return ok_status(); }
#endif

}  // namespace gemma3
