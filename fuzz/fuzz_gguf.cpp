// libFuzzer target: the GGUF reader on arbitrary bytes, then everything a loader does with a
// file that parsed: every metadata getter on every key, value_to_string, reading every tensor's
// bytes, the tokenizer rebuilt from tokenizer.ggml.*, and Checkpoint::open (config, tokenizer,
// tensor binding). Any crash, sanitizer report or leak is a finding; error Statuses are not.
//
// Limitation: tensor data points into the file's mapping, which ASan does not track; a view
// that ran past the end of the file would only fault when it crosses a page boundary. The
// harness therefore also checks each tensor's nbytes against its shape and the file size.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "checkpoint/gguf.h"
#include "checkpoint/weights.h"
#include "fuzz_common.h"
#include "text/tokenizer_gguf.h"

namespace {

void exercise_metadata(const gemma3::GgufFile& f) {
  for (const std::string& key : f.keys()) {
    FUZZ_CHECK(f.has(key));
    (void)f.type_of(key);
    (void)f.get_string(key);
    (void)f.get_int(key);
    (void)f.get_float(key);
    (void)f.get_bool(key);
    (void)f.array_size(key);
    (void)f.get_string_array(key);
    (void)f.get_float_array(key);
    (void)f.get_int_array(key);
    (void)f.value_to_string(key, 0);
    (void)f.value_to_string(key);
  }
}

void exercise_tensors(const gemma3::GgufFile& f, uint64_t file_size) {
  for (const gemma3::TensorView& t : f.tensors()) {
    FUZZ_CHECK(f.find_tensor(t.name) == &t);
    FUZZ_CHECK(t.nbytes <= file_size);
    FUZZ_CHECK(!t.shape.empty());
    std::optional<uint64_t> rb = gemma3::row_bytes(t.dtype, t.shape.back());
    FUZZ_CHECK(rb.has_value());
    uint64_t expect = *rb;
    for (size_t d = 0; d + 1 < t.shape.size(); ++d) expect *= static_cast<uint64_t>(t.shape[d]);
    FUZZ_CHECK(expect == t.nbytes);
    // Touch every byte: a view outside the mapping faults (at page granularity).
    const volatile uint8_t* p = static_cast<const uint8_t*>(t.data);
    uint8_t acc = 0;
    for (uint64_t i = 0; i < t.nbytes; ++i) acc ^= p[i];
    (void)acc;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& path = gemma3::fuzz::scratch_path(".gguf");
  gemma3::fuzz::write_file(path, data, size);
  {
    gemma3::Result<gemma3::GgufFile> f = gemma3::GgufFile::open(path);
    if (!f.ok()) {
      FUZZ_CHECK(!f.status().message().empty());
      return 0;
    }
    exercise_metadata(*f);
    exercise_tensors(*f, size);
    if (f->has("tokenizer.ggml.tokens")) {
      gemma3::Result<gemma3::Tokenizer> tok = gemma3::tokenizer_from_gguf(*f);
      if (tok.ok()) {
        auto ids = tok->encode("Hello <start_of_turn>world\n", /*parse_special=*/true);
        if (ids.ok()) (void)tok->decode(*ids);
      }
    }
    if (!f->has("general.architecture")) return 0;
  }
  gemma3::Result<std::unique_ptr<gemma3::Checkpoint>> ck = gemma3::Checkpoint::open(path);
  if (ck.ok()) (void)(*ck)->weight_bytes();
  return 0;
}
