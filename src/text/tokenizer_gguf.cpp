#include "text/tokenizer_gguf.h"

#include <fmt/format.h>

namespace gemma3 {

Result<Tokenizer> tokenizer_from_gguf(const GgufFile& gguf) {
  const std::string where = gguf.path();
  if (gguf.has("tokenizer.ggml.model")) {
    GEMMA3_ASSIGN_OR_RETURN(std::string model, gguf.get_string("tokenizer.ggml.model"));
    if (model != "llama") {
      return unsupported(
          fmt::format("{}: tokenizer.ggml.model is {:?}, expected \"llama\" (SentencePiece, as in "
                      "Gemma 3 GGUFs)",
                      where, model));
    }
  }
  GEMMA3_ASSIGN_OR_RETURN(std::vector<std::string> tokens, gguf.get_string_array("tokenizer.ggml.tokens"));
  GEMMA3_ASSIGN_OR_RETURN(std::vector<float> scores, gguf.get_float_array("tokenizer.ggml.scores"));
  GEMMA3_ASSIGN_OR_RETURN(std::vector<int64_t> types64, gguf.get_int_array("tokenizer.ggml.token_type"));

  std::vector<int32_t> types(types64.size());
  for (size_t i = 0; i < types64.size(); ++i) {
    if (types64[i] < 1 || types64[i] > 6) {
      return invalid_file(fmt::format("{}: tokenizer.ggml.token_type[{}] = {}, expected 1..6 (NORMAL..BYTE)",
                                      where, i, types64[i]));
    }
    types[i] = static_cast<int32_t>(types64[i]);
  }
  // The converter writes <unk> as CONTROL; the GGUF names the real unknown id (3 for Gemma 3).
  if (gguf.has("tokenizer.ggml.unknown_token_id")) {
    GEMMA3_ASSIGN_OR_RETURN(int64_t unk, gguf.get_int("tokenizer.ggml.unknown_token_id"));
    if (unk < 0 || static_cast<uint64_t>(unk) >= types.size()) {
      return invalid_file(fmt::format("{}: tokenizer.ggml.unknown_token_id = {} is outside the {} tokens",
                                      where, unk, types.size()));
    }
    types[unk] = static_cast<int32_t>(PieceType::kUnknown);
  }

  Result<Tokenizer> tok = Tokenizer::from_vocab(tokens, scores, types);
  if (!tok.ok()) return tok.status().with_context(where + ": tokenizer.ggml.*");

  // The ids we find by piece text must be the ones the file declares. Exporters of -it models
  // may declare <end_of_turn> as eos (HF's tokenizer_config does); both stop generation.
  if (gguf.has("tokenizer.ggml.bos_token_id")) {
    GEMMA3_ASSIGN_OR_RETURN(int64_t id, gguf.get_int("tokenizer.ggml.bos_token_id"));
    if (id != tok->bos_id()) {
      return invalid_file(fmt::format("{}: tokenizer.ggml.bos_token_id = {} but \"<bos>\" is id {}", where,
                                      id, tok->bos_id()));
    }
  }
  if (gguf.has("tokenizer.ggml.eos_token_id")) {
    GEMMA3_ASSIGN_OR_RETURN(int64_t id, gguf.get_int("tokenizer.ggml.eos_token_id"));
    if (id != tok->eos_id() && id != tok->end_of_turn_id()) {
      return invalid_file(
          fmt::format("{}: tokenizer.ggml.eos_token_id = {} but \"<eos>\" is id {} and "
                      "\"<end_of_turn>\" id {}",
                      where, id, tok->eos_id(), tok->end_of_turn_id()));
    }
  }
  return tok;
}

}  // namespace gemma3
