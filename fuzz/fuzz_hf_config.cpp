// libFuzzer target: Hugging Face config.json text through parse_hf_config (architecture,
// sparse text/vision configs, rope and layer-type key drift, validation) and
// parse_hf_quantization (compressed-tensors quantization_config), both straight from memory.
// Error Statuses are expected; crashes, uncaught nlohmann::json exceptions, sanitizer reports
// and leaks are findings.
#include <cstdint>
#include <string>
#include <string_view>

#include "checkpoint/hf_config.h"
#include "fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  gemma3::Result<gemma3::ModelConfig> c = gemma3::parse_hf_config(text, "fuzz/config.json");
  if (c.ok()) {
    FUZZ_CHECK(static_cast<int>(c->layer_types.size()) == c->n_layers);
    FUZZ_CHECK(c->validate("fuzz/config.json").ok());
    (void)c->attn_scale();
    (void)c->n_global_layers();
  } else {
    FUZZ_CHECK(!c.status().message().empty());
  }
  gemma3::Result<gemma3::HfQuantization> q = gemma3::parse_hf_quantization(text, "fuzz/config.json");
  if (q.ok()) (void)q->describe();
  return 0;
}
