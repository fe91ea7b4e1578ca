// A hand-written protobuf wire-format reader/writer for SentencePiece's ModelProto.
//
// Debian's libsentencepiece-dev ships sentencepiece_processor.h but not the generated
// sentencepiece_model.pb.h, and the proto is small, so we encode the few fields we need by hand.
// Field numbers are from sentencepiece's public src/sentencepiece_model.proto:
//   ModelProto      { repeated SentencePiece pieces = 1; TrainerSpec trainer_spec = 2;
//                     NormalizerSpec normalizer_spec = 3; NormalizerSpec denormalizer_spec = 5; }
//   SentencePiece   { string piece = 1; float score = 2; Type type = 3; }
//   TrainerSpec     { model_type = 3; vocab_size = 4; split_by_unicode_script = 21;
//                     split_by_whitespace = 22; split_by_number = 23;
//                     treat_whitespace_as_suffix = 24; split_digits = 25;
//                     allow_whitespace_only_pieces = 26; byte_fallback = 35; unk_id = 40;
//                     bos_id = 41; eos_id = 42; pad_id = 43; unk_piece = 45; bos_piece = 46;
//                     eos_piece = 47; pad_piece = 48; }
//   NormalizerSpec  { name = 1; precompiled_charsmap = 2; add_dummy_prefix = 3;
//                     remove_extra_whitespaces = 4; escape_whitespaces = 5; }
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "gemma3/status.h"
#include "gemma3/tokenizer.h"

namespace gemma3::spm {

struct Piece {
  std::string piece;  // UTF-8, "▁" (U+2581) for a space; never empty
  float score = 0.0f;
  PieceType type = PieceType::kNormal;
};

// The TrainerSpec fields that affect encoding, plus the training-time flags Gemma's tokenizer
// was trained with (they do not change encoding; written so the proto describes the model).
struct TrainerSpec {
  int32_t model_type = 2;  // BPE
  int32_t vocab_size = 0;
  bool byte_fallback = true;
  bool treat_whitespace_as_suffix = false;
  bool split_digits = true;
  bool split_by_unicode_script = true;
  bool split_by_whitespace = true;
  bool split_by_number = true;
  bool allow_whitespace_only_pieces = true;
  int32_t unk_id = -1, bos_id = -1, eos_id = -1, pad_id = -1;  // -1: not defined
  std::string unk_piece = "<unk>", bos_piece = "<bos>", eos_piece = "<eos>", pad_piece = "<pad>";
};

struct NormalizerSpec {
  std::string name = "identity";  // no NFKC; empty precompiled_charsmap
  bool add_dummy_prefix = false;
  bool remove_extra_whitespaces = false;
  bool escape_whitespaces = true;  // ' ' -> "▁" before matching pieces
};

// Serialized ModelProto bytes, loadable with SentencePieceProcessor::LoadFromSerializedProto.
std::string serialize_model_proto(const std::vector<Piece>& pieces, const TrainerSpec& trainer,
                                  const NormalizerSpec& normalizer);
// The trainer_spec and normalizer_spec fields alone (what ParsedModelProto::other_fields holds).
std::string serialize_spec_fields(const TrainerSpec& trainer, const NormalizerSpec& normalizer);

// The ModelProto settings that decide how SentencePiece encodes a text, read from the
// trainer_spec / normalizer_spec fields with proto2's defaults for absent ones (a repeated
// message merges: the last value of a field wins).
struct EncodingSpec {
  int32_t model_type = 1;  // TrainerSpec.model_type: 1 UNIGRAM (default), 2 BPE, 3 WORD, 4 CHAR
  bool byte_fallback = false;
  bool treat_whitespace_as_suffix = false;
  bool has_precompiled_charsmap = false;  // a non-empty NormalizerSpec.precompiled_charsmap
  bool add_dummy_prefix = true;
  bool remove_extra_whitespaces = true;
  bool escape_whitespaces = true;
};
Result<EncodingSpec> parse_encoding_spec(std::string_view other_fields);

// A ModelProto split into its pieces and everything else, for editing piece types.
struct ParsedModelProto {
  std::vector<Piece> pieces;
  // Every top-level field other than `pieces` (trainer_spec, normalizer_spec, ...), as the
  // original wire bytes in their original order, so they survive a rewrite unchanged.
  std::string other_fields;
};

// Parses a serialized ModelProto. Unknown sub-fields of a SentencePiece message (extensions)
// are dropped; unknown top-level fields are kept in other_fields.
Result<ParsedModelProto> parse_model_proto(std::string_view bytes);

// The inverse of parse_model_proto (pieces first, then other_fields).
std::string serialize_model_proto(const std::vector<Piece>& pieces, std::string_view other_fields);

}  // namespace gemma3::spm
