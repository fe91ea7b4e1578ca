// Gemma 3 tokenizer: the SentencePiece library, loaded from a checkpoint's tokenizer.model or
// from a model proto rebuilt from a GGUF vocabulary.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "gemma3/status.h"

namespace gemma3 {

// SentencePiece piece types (ModelProto.SentencePiece.Type, same numbers as GGUF's
// tokenizer.ggml.token_type).
enum class PieceType : int32_t { kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6 };

class Tokenizer {
 public:
  Tokenizer();
  ~Tokenizer();
  Tokenizer(const Tokenizer&);
  Tokenizer& operator=(const Tokenizer&);
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  // From a vocabulary (pieces in id order, BPE merge scores, types).
  static Result<Tokenizer> from_vocab(const std::vector<std::string>& pieces, const std::vector<float>& scores,
                                      const std::vector<int32_t>& types);
  static Result<Tokenizer> from_model_file(const std::string& path);          // tokenizer.model
  static Result<Tokenizer> from_serialized_proto(const std::string& bytes);  // ModelProto bytes

  // Ids for text, no BOS. With parse_special, control-token text such as "<end_of_turn>"
  // becomes the control id; otherwise it is tokenized as plain text (the default: user text
  // cannot forge turns).
  Result<std::vector<int32_t>> encode(std::string_view text, bool parse_special = false) const;
  // The bytes a token stands for ("▁" as space, <0x0A> as one byte, control tokens as "").
  std::string decode(int32_t id) const;
  std::string decode(const std::vector<int32_t>& ids) const;

  int32_t n_vocab() const;
  std::string_view piece(int32_t id) const;
  PieceType type(int32_t id) const;
  std::optional<int32_t> find(std::string_view piece) const;

  int32_t bos_id() const;           // <bos>
  int32_t eos_id() const;           // <eos>
  int32_t start_of_turn_id() const; // <start_of_turn>, -1 when absent
  int32_t end_of_turn_id() const;   // <end_of_turn>, -1 when absent

 private:
  struct Impl;
  explicit Tokenizer(std::shared_ptr<const Impl> impl);
  std::shared_ptr<const Impl> impl_;
};

}  // namespace gemma3
