// libFuzzer target: a single .safetensors file (8-byte header length, JSON header, data) through
// SafetensorsSet::open, which parses the header, checks offsets tile the data, and folds fp8
// `_scale` tensors into row_scale. Every tensor's bytes are then read. Error Statuses are
// expected; crashes, sanitizer reports, leaks and violated invariants are findings.
#include <cstdint>
#include <string>

#include "checkpoint/safetensors.h"
#include "fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& path = gemma3::fuzz::scratch_path(".safetensors");
  gemma3::fuzz::write_file(path, data, size);
  gemma3::Result<gemma3::SafetensorsSet> set = gemma3::SafetensorsSet::open(path);
  if (!set.ok()) {
    FUZZ_CHECK(!set.status().message().empty());
    return 0;
  }
  uint64_t total = 0;
  for (const gemma3::TensorView& t : set->tensors()) {
    FUZZ_CHECK(set->find_tensor(t.name) != nullptr);
    FUZZ_CHECK(set->file_of(t.name) == path);
    FUZZ_CHECK(t.nbytes <= size);
    total += t.nbytes;
    const volatile uint8_t* p = static_cast<const uint8_t*>(t.data);
    uint8_t acc = 0;
    for (uint64_t i = 0; i < t.nbytes; ++i) acc ^= p[i];
    (void)acc;
    float s = 0;
    for (float v : t.row_scale) s += v;
    (void)s;
  }
  FUZZ_CHECK(total <= size);
  return 0;
}
