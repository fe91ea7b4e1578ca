// Backend::sample's default (backend.h). Compiled into libgemma3 and into the CUDA module, whose
// backend class derives from Backend (src/backend/cuda/cuda_module.h).
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

}  // namespace gemma3
