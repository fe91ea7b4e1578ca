// libFuzzer target: render_chat (the Gemma 3 chat template as ids) with the tiny test
// tokenizer. Input layout: byte 0 holds the flags (bit 0 add_bos, bit 1
// add_generation_prompt); the rest is split at 0x00 bytes into messages, each starting with a
// role byte (mod 6: user, model, assistant, system, "" and "tool") followed by its content.
// Errors (bad role order, invalid UTF-8) are expected; crashes, sanitizer reports and ids
// outside the vocabulary are findings.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz_common.h"
#include "text/chat_template.h"

namespace {

const gemma3::Tokenizer* g_tok = nullptr;

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const std::string path = std::string(GEMMA3_SOURCE_DIR) + "/tests/data/tiny/tokenizer.model";
  auto tok = gemma3::Tokenizer::from_model_file(path);
  if (!tok.ok()) {
    std::fprintf(stderr, "fuzz_chat_template: cannot load %s: %s\n", path.c_str(),
                 tok.status().to_string().c_str());
    std::abort();
  }
  g_tok = new gemma3::Tokenizer(std::move(tok).value());
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  static const char* const kRoles[] = {"user", "model", "assistant", "system", "", "tool"};
  const bool add_bos = data[0] & 1, add_prompt = data[0] & 2;
  std::vector<gemma3::ChatMessage> messages;
  std::string_view rest(reinterpret_cast<const char*>(data + 1), size - 1);
  while (!rest.empty()) {
    const size_t end = rest.find('\0');
    std::string_view m = rest.substr(0, end);
    if (!m.empty()) {
      messages.push_back({kRoles[static_cast<uint8_t>(m[0]) % 6], std::string(m.substr(1))});
    }
    if (end == std::string_view::npos) break;
    rest.remove_prefix(end + 1);
  }
  auto ids = gemma3::render_chat(*g_tok, messages, add_bos, add_prompt);
  if (!ids.ok()) {
    FUZZ_CHECK(!ids.status().message().empty());
    return 0;
  }
  FUZZ_CHECK(!ids->empty());
  if (add_bos) FUZZ_CHECK(ids->front() == g_tok->bos_id());
  for (int32_t id : *ids) FUZZ_CHECK(id >= 0 && id < g_tok->n_vocab());
  (void)g_tok->decode(*ids);
  return 0;
}
