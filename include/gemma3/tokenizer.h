// Gemma 3 tokenizer: a SentencePiece BPE model, loaded from a checkpoint's tokenizer.model or
// from a model proto rebuilt from a GGUF vocabulary. encode() runs a built-in BPE that gives
// the SentencePiece library's ids (encode_ref) chunk by chunk: 15-60 MB/s on prose (the
// library: 0.3-1 MB/s), and beyond the ids at most 4 MB plus ~40 bytes per byte of the
// longest chunk, a word in prose (docs/perf.md, "Tokenizer").
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
enum class PieceType : int32_t {
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,
  kUserDefined = 4,
  kUnused = 5,
  kByte = 6
};

class Tokenizer {
 public:
  Tokenizer();
  ~Tokenizer();
  Tokenizer(const Tokenizer&);
  Tokenizer& operator=(const Tokenizer&);
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  // From a vocabulary (pieces in id order, BPE merge scores, types).
  static Result<Tokenizer> from_vocab(const std::vector<std::string>& pieces,
                                      const std::vector<float>& scores, const std::vector<int32_t>& types);
  static Result<Tokenizer> from_model_file(const std::string& path);         // tokenizer.model
  static Result<Tokenizer> from_serialized_proto(const std::string& bytes);  // ModelProto bytes
  // The tokenizer a checkpoint carries (a GGUF's metadata, an HF folder's tokenizer files),
  // read without its weights.
  static Result<Tokenizer> from_checkpoint(const std::string& path);

  // Ids for text, no BOS. With parse_special, control-token text such as "<end_of_turn>"
  // becomes the control id; otherwise it is tokenized as plain text (the default: user text
  // cannot forge turns).
  Result<std::vector<int32_t>> encode(std::string_view text, bool parse_special = false) const;
  // The same ids from the SentencePiece library, each plain segment in one call (what encode()
  // did before it had its own BPE; the oracle the tests compare it with). Slow on long texts:
  // ~0.2 MB/s and ~100 bytes of memory per input byte.
  Result<std::vector<int32_t>> encode_ref(std::string_view text, bool parse_special = false) const;
  // "" when encode() runs the built-in BPE; otherwise why this vocabulary needs the library
  // (then encode() is encode_ref()).
  std::string_view encode_fallback_reason() const;
  // The most input bytes one id of encode() can stand for, with or without parse_special (Gemma
  // 3: 93, "▁" x 31, whose "▁" may each be a literal U+2581 of 3 bytes; 48 without U+2581 in
  // the text). A text of B bytes has at least ceil(B / max_piece_bytes()) ids.
  int max_piece_bytes() const;
  // The SentencePiece ModelProto (tokenizer.model bytes) encode_ref() runs, types repaired.
  std::string sentencepiece_model_proto() const;
  // The bytes a token stands for ("▁" as space, <0x0A> as one byte, control tokens as "").
  std::string decode(int32_t id) const;
  std::string decode(const std::vector<int32_t>& ids) const;

  int32_t n_vocab() const;
  std::string_view piece(int32_t id) const;
  PieceType type(int32_t id) const;
  std::optional<int32_t> find(std::string_view piece) const;

  int32_t bos_id() const;            // <bos>
  int32_t eos_id() const;            // <eos>
  int32_t start_of_turn_id() const;  // <start_of_turn>, -1 when absent
  int32_t end_of_turn_id() const;    // <end_of_turn>, -1 when absent

 private:
  struct Impl;
  explicit Tokenizer(std::shared_ptr<const Impl> impl);
  std::shared_ptr<const Impl> impl_;
};

}  // namespace gemma3
