// Prints, as Markdown table rows, the error each class of malformed input gets from the public
// entry points (docs/reliability.md embeds the output). Built with the fuzz targets:
//   build/fuzz/fuzz/bad_input_report
// Every input here must fail with a Status; a success or a crash is a bug.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "checkpoint/gguf.h"
#include "checkpoint/hf_config.h"
#include "checkpoint/safetensors.h"
#include "checkpoint/weights.h"
#include "fuzz_common.h"
#include "gemma3/tokenizer.h"
#include "text/chat_template.h"

namespace {

using Bytes = std::string;

void row(const char* area, const char* what, const gemma3::Status& st, const std::string& path = "") {
  std::string msg = st.ok() ? "ACCEPTED (bug)" : st.to_string();
  if (!path.empty()) {  // the scratch path varies per run
    for (size_t p; (p = msg.find(path)) != std::string::npos;) msg.replace(p, path.size(), "FILE");
  }
  for (size_t p = 0; (p = msg.find('|', p)) != std::string::npos; p += 2) msg.replace(p, 1, "\\|");
  if (msg.size() > 230) msg = msg.substr(0, 227) + "...";
  std::printf("| %s | %s | %s |\n", area, what, msg.c_str());
}

// ---- GGUF bytes -----------------------------------------------------------------------------
void u32(Bytes& b, uint32_t v) { b.append(reinterpret_cast<const char*>(&v), 4); }
void u64(Bytes& b, uint64_t v) { b.append(reinterpret_cast<const char*>(&v), 8); }
void str(Bytes& b, const std::string& s) { u64(b, s.size()), b += s; }
Bytes header(uint64_t n_tensors, uint64_t n_kv, uint32_t version = 3) {
  Bytes b = "GGUF";
  u32(b, version), u64(b, n_tensors), u64(b, n_kv);
  return b;
}
// One tensor info: name, ne, ggml type, offset.
void tinfo(Bytes& b, const std::string& name, std::vector<uint64_t> ne, uint32_t type, uint64_t off) {
  str(b, name), u32(b, static_cast<uint32_t>(ne.size()));
  for (uint64_t n : ne) u64(b, n);
  u32(b, type), u64(b, off);
}
void pad(Bytes& b) { b.resize((b.size() + 31) / 32 * 32, '\0'); }

void gguf(const char* what, const Bytes& b) {
  const std::string& path = gemma3::fuzz::scratch_path(".gguf");
  gemma3::fuzz::write_file(path, reinterpret_cast<const uint8_t*>(b.data()), b.size());
  row("GGUF", what, gemma3::GgufFile::open(path).status(), path);
}
void checkpoint(const char* what, const Bytes& b) {
  const std::string& path = gemma3::fuzz::scratch_path(".gguf");
  gemma3::fuzz::write_file(path, reinterpret_cast<const uint8_t*>(b.data()), b.size());
  row("GGUF model", what, gemma3::Checkpoint::open(path).status(), path);
}

// ---- safetensors bytes ----------------------------------------------------------------------
Bytes st(const std::string& json, size_t data_bytes, int64_t len_override = -1) {
  Bytes b;
  u64(b, len_override >= 0 ? static_cast<uint64_t>(len_override) : json.size());
  b += json;
  b.append(data_bytes, '\0');
  return b;
}
void safetensors(const char* what, const Bytes& b) {
  const std::string& path = gemma3::fuzz::scratch_path(".gguf");  // one scratch file per process
  gemma3::fuzz::write_file(path, reinterpret_cast<const uint8_t*>(b.data()), b.size());
  row("safetensors", what, gemma3::SafetensorsSet::open(path).status(), path);
}

void config(const char* what, const std::string& json) {
  row("config.json", what, gemma3::parse_hf_config(json, "config.json").status());
}

const std::string kFlat =
    R"("model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
       "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 512,
       "sliding_window": 8)";

}  // namespace

int main() {
  std::printf("| input | class of bad input | error |\n|---|---|---|\n");
  // GGUF reader.
  gguf("empty file", "");
  gguf("wrong magic (a safetensors file)", st("{}", 0));
  gguf("big-endian GGUF", [] {
    Bytes b = "GGUF";
    b += std::string("\0\0\0\3", 4);
    u64(b, 0), u64(b, 0);
    return b;
  }());
  gguf("GGUF version 1", header(0, 0, 1));
  gguf("unknown version 7", header(0, 0, 7));
  gguf("truncated header", header(0, 0).substr(0, 15));
  gguf("key-value count larger than the file", header(0, 1u << 30));
  gguf("key with absurd length", [] {
    Bytes b = header(0, 1);
    u64(b, 1ull << 40);
    b.append(16, 0);
    return b;
  }());
  gguf("unknown value type tag", [] {
    Bytes b = header(0, 1);
    str(b, "k"), u32(b, 13), u32(b, 0);
    return b;
  }());
  gguf("string value runs past the end", [] {
    Bytes b = header(0, 1);
    str(b, "k"), u32(b, 8), u64(b, 1000);
    return b;
  }());
  gguf("string array count too large", [] {
    Bytes b = header(0, 1);
    str(b, "k"), u32(b, 9), u32(b, 8), u64(b, 1ull << 60);
    return b;
  }());
  gguf("nested array", [] {
    Bytes b = header(0, 1);
    str(b, "k"), u32(b, 9), u32(b, 9), u64(b, 1);
    return b;
  }());
  gguf("BOOL value 2", [] {
    Bytes b = header(0, 1);
    str(b, "k"), u32(b, 7), b += '\2';
    return b;
  }());
  gguf("duplicate key", [] {
    Bytes b = header(0, 2);
    for (int i = 0; i < 2; ++i) str(b, "k"), u32(b, 4), u32(b, 1);
    return b;
  }());
  gguf("alignment not a power of two", [] {
    Bytes b = header(0, 1);
    str(b, "general.alignment"), u32(b, 4), u32(b, 24);
    return b;
  }());
  gguf("tensor with 5 dimensions", [] {
    Bytes b = header(1, 0);
    tinfo(b, "t", {1, 1, 1, 1, 1}, 0, 0);
    return b;
  }());
  gguf("tensor element count overflows", [] {
    Bytes b = header(1, 0);
    tinfo(b, "t", {1ull << 32, 1ull << 32}, 0, 0);
    return b;
  }());
  gguf("unsupported tensor type (IQ2_XXS)", [] {
    Bytes b = header(1, 0);
    tinfo(b, "t", {256}, 16, 0);
    return b;
  }());
  gguf("row not a whole number of Q4_0 blocks", [] {
    Bytes b = header(1, 0);
    tinfo(b, "t", {33}, 2, 0);
    return b;
  }());
  gguf("misaligned tensor offset", [] {
    Bytes b = header(1, 0);
    tinfo(b, "t", {4}, 0, 4);
    pad(b);
    b.append(64, 0);
    return b;
  }());
  gguf("tensor data past the end (truncated)", [] {
    Bytes b = header(1, 0);
    tinfo(b, "t", {64}, 0, 0);
    pad(b);
    b.append(16, 0);
    return b;
  }());
  gguf("overlapping tensors", [] {
    Bytes b = header(2, 0);
    tinfo(b, "a", {16}, 0, 0);
    tinfo(b, "b", {16}, 0, 32);
    pad(b);
    b.append(128, 0);
    return b;
  }());
  gguf("duplicate tensor name", [] {
    Bytes b = header(2, 0);
    tinfo(b, "a", {8}, 0, 0);
    tinfo(b, "a", {8}, 0, 32);
    pad(b);
    b.append(64, 0);
    return b;
  }());
  gguf("tensor name not UTF-8", [] {
    Bytes b = header(1, 0);
    tinfo(b, "\xff\xfe", {8}, 0, 0);
    pad(b);
    b.append(32, 0);
    return b;
  }());
  checkpoint("architecture is not gemma3", [] {
    Bytes b = header(0, 1);
    str(b, "general.architecture"), u32(b, 8), str(b, "llama");
    return b;
  }());
  checkpoint("required key missing", [] {
    Bytes b = header(0, 1);
    str(b, "general.architecture"), u32(b, 8), str(b, "gemma3");
    return b;
  }());
  checkpoint("key of the wrong type", [] {
    Bytes b = header(0, 2);
    str(b, "general.architecture"), u32(b, 8), str(b, "gemma3");
    str(b, "gemma3.block_count"), u32(b, 8), str(b, "x");
    return b;
  }());

  // safetensors.
  safetensors("file shorter than 8 bytes", "abc");
  safetensors("header length above 100 MB", st("{}", 0, 1ll << 40));
  safetensors("header length past the end", st("{}", 0, 4096));
  safetensors("header not JSON", st("{\"a\": ", 0));
  safetensors("header a JSON array", st("[1, 2]", 0));
  safetensors(
      "duplicate tensor name",
      st(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})",
         8));
  safetensors("unknown dtype", st(R"({"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}})", 1));
  safetensors("valid but unloadable dtype (I32)",
              st(R"({"a": {"dtype": "I32", "shape": [1], "data_offsets": [0, 4]}})", 4));
  safetensors("negative dimension",
              st(R"({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", 4));
  safetensors("data_offsets disagree with the shape",
              st(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}})", 4));
  safetensors("data past the end (truncated)",
              st(R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", 8));
  safetensors(
      "hole between tensors",
      st(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}})",
         12));
  safetensors(
      "overlapping tensors",
      st(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})",
         8));
  safetensors("bytes left over after the last tensor",
              st(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})", 12));
  safetensors("F8_E4M3 weight without a scale",
              st(R"({"w.weight": {"dtype": "F8_E4M3", "shape": [2, 2], "data_offsets": [0, 4]}})", 4));
  safetensors(
      "F8_E4M3 weight with a block scale",
      st(R"({"w.weight": {"dtype": "F8_E4M3", "shape": [2, 2], "data_offsets": [0, 4]}, "w.weight_scale": {"dtype": "F32", "shape": [2, 2], "data_offsets": [4, 20]}})",
         20));

  // config.json.
  config("not JSON", "{\"model_type\": ");
  config("JSON but not an object", "[]");
  config("another model type (llama)", R"({"model_type": "llama"})");
  config("another architecture", R"({"architectures": ["LlamaForCausalLM"]})");
  config("required key missing", R"({"model_type": "gemma3_text", "hidden_size": 64})");
  config("number given as a string", "{" + kFlat + R"(, "max_position_embeddings": "4096"})");
  config("integer above 2^31", "{" + kFlat + R"(, "max_position_embeddings": 1099511627776})");
  config("layer_types length differs from num_hidden_layers",
         "{" + kFlat + R"(, "layer_types": ["full_attention"]})");
  config("unsupported RoPE type (yarn)",
         "{" + kFlat + R"(, "rope_scaling": {"rope_type": "yarn", "factor": 4}})");
  config("Gemma 2 logit soft-capping", "{" + kFlat + R"(, "final_logit_softcapping": 30.0})");
  config("inconsistent heads (3 heads, 2 KV heads)",
         "{" + kFlat + R"(, "num_attention_heads": 3, "num_key_value_heads": 2})");

  // Tokenizer and chat template.
  row("tokenizer.model", "not a protobuf",
      gemma3::Tokenizer::from_serialized_proto("not a protobuf").status());
  row("tokenizer.model", "truncated piece",
      gemma3::Tokenizer::from_serialized_proto(std::string("\x0a\x10\x0a\x03", 4)).status());
  row("tokenizer.model", "piece type 9",
      gemma3::Tokenizer::from_serialized_proto(std::string("\x0a\x05\x0a\x01"
                                                           "a\x18\x09",
                                                           7))
          .status());
  row("tokenizer.model", "only an <unk> piece",
      gemma3::Tokenizer::from_serialized_proto(std::string("\x0a\x09\x0a\x05<unk>\x18\x02", 11)).status());
  auto tok =
      gemma3::Tokenizer::from_model_file(std::string(GEMMA3_SOURCE_DIR) + "/tests/data/tiny/tokenizer.model");
  if (!tok.ok()) return 1;
  row("text", "invalid UTF-8 (lone continuation byte)", tok->encode("ok \x80 no").status());
  row("text", "UTF-16 surrogate encoded in UTF-8", tok->encode("\xed\xa0\x80").status());
  row("chat", "no messages", gemma3::render_chat(*tok, {}, true, true).status());
  row("chat", "unknown role", gemma3::render_chat(*tok, {{"tool", "x"}}, true, true).status());
  row("chat", "roles do not alternate",
      gemma3::render_chat(*tok, {{"user", "a"}, {"user", "b"}}, true, true).status());
  row("chat", "system message not first",
      gemma3::render_chat(*tok, {{"user", "a"}, {"system", "b"}}, true, true).status());
  row("chat", "message not UTF-8", gemma3::render_chat(*tok, {{"user", "\xc3"}}, true, true).status());
  return 0;
}
