// Gemma 3 tokenizer: a SentencePiece BPE model. encode() runs our own BPE
// (text/tokenizer_bpe.h: the library's algorithm on independent chunks, identical ids);
// encode_ref() and vocabularies the built-in BPE does not reproduce use the SentencePiece
// library, which stays loaded as the oracle and for piece lookups.
//
// Both entry points end in a SentencePiece ModelProto: from_vocab builds one from a vocabulary
// (GGUF tokenizer.ggml.* arrays, docs/formats.md §4.6), from_model_file / from_serialized_proto
// parse an existing one. In both cases piece types are repaired the same way before loading:
//
//  * Control pieces are never matched in raw text by SentencePiece. We make every Gemma control
//    name (<bos>, <eos>, <pad>, <mask>, <start_of_turn>, <end_of_turn>, <start_of_image>,
//    <end_of_image>, <image_soft_token>, <unusedN>) CONTROL, whatever type the checkpoint gave
//    it: the original tokenizer.model marks most of them USER_DEFINED (matched in raw text, so
//    user text could forge turns), some GGUF exporters marked them NORMAL (BPE-split, which
//    breaks chat prompts), and the llama.cpp converter marks <start_of_image> USER_DEFINED.
//    encode(text, parse_special=true) finds their text itself and emits their ids.
//  * Other USER_DEFINED pieces (newline/tab/space runs, HTML tags such as <b>) stay
//    USER_DEFINED: SentencePiece and Hugging Face both match them verbatim in raw text.
//  * <unk> becomes UNKNOWN when no piece is (the GGUF converter writes it as CONTROL and
//    SentencePiece refuses a model without an UNKNOWN piece).
//  * (from_vocab only) The llama.cpp converter replaced "▁" by " " in USER_DEFINED pieces;
//    SentencePiece escapes spaces to "▁" before matching, so we map them back (138 "▁▁").
#include "gemma3/tokenizer.h"

#include <fmt/format.h>
#include <sentencepiece_processor.h>

#include <algorithm>
#include <array>
#include <functional>
#include <unordered_map>

#include "gemma3/util.h"
#include "io/mapped_file.h"
#include "text/spm_proto.h"
#include "text/tokenizer_bpe.h"

namespace gemma3 {
namespace {

constexpr size_t kMaxVocab = size_t{4} << 20;              // 4M pieces: far above any Gemma vocabulary
constexpr std::string_view kSpaceSymbol = "\xE2\x96\x81";  // "▁" U+2581

bool is_unused_name(std::string_view s) {  // <unusedN>
  constexpr std::string_view kPrefix = "<unused";
  if (s.size() < kPrefix.size() + 2 || s.substr(0, kPrefix.size()) != kPrefix || s.back() != '>')
    return false;
  std::string_view digits = s.substr(kPrefix.size(), s.size() - kPrefix.size() - 1);
  return std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; });
}

bool is_gemma_control_name(std::string_view s) {
  static constexpr std::array<std::string_view, 10> kNames = {"<pad>",          "<eos>",
                                                              "<bos>",          "<unk>",
                                                              "<mask>",         "<start_of_turn>",
                                                              "<end_of_turn>",  "<start_of_image>",
                                                              "<end_of_image>", "<image_soft_token>"};
  return std::find(kNames.begin(), kNames.end(), s) != kNames.end() || is_unused_name(s);
}

// "<0xHH>" (upper- or lower-case hex) -> HH, or -1.
int parse_byte_piece(std::string_view s) {
  if (s.size() != 6 || s.substr(0, 3) != "<0x" || s[5] != '>') return -1;
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  const int hi = hex(s[3]), lo = hex(s[4]);
  return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
}

std::string replace_all(std::string_view s, std::string_view from, std::string_view to) {
  std::string out;
  size_t pos = 0;
  while (true) {
    size_t hit = s.find(from, pos);
    if (hit == std::string_view::npos) break;
    out.append(s.substr(pos, hit - pos));
    out.append(to);
    pos = hit + from.size();
  }
  out.append(s.substr(pos));
  return out;
}

// The type repairs described at the top of this file that both entry points share.
void repair_types(std::vector<spm::Piece>& pieces) {
  const bool has_unknown = std::any_of(pieces.begin(), pieces.end(),
                                       [](const spm::Piece& p) { return p.type == PieceType::kUnknown; });
  for (spm::Piece& p : pieces) {
    if (p.piece == "<unk>" && !has_unknown) {
      p.type = PieceType::kUnknown;
    } else if (p.type != PieceType::kUnknown && p.type != PieceType::kByte &&
               is_gemma_control_name(p.piece)) {
      p.type = PieceType::kControl;
    }
  }
}

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};

}  // namespace

struct Tokenizer::Impl {
  sentencepiece::SentencePieceProcessor sp;
  std::vector<PieceType> types;  // [n_vocab]
  // Control/unknown piece text -> id, for encode(parse_special=true). Matched leftmost-longest.
  std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>> special_ids;
  std::vector<size_t> special_lengths;    // distinct lengths of special_ids keys, longest first
  std::array<bool, 256> special_first{};  // first bytes of special_ids keys
  int32_t bos = -1, eos = -1, sot = -1, eot = -1;
  std::unique_ptr<const BpeEncoder> bpe;  // null: encode() uses the library (bpe_unsupported says why)
  std::string bpe_unsupported;
  int max_piece_bytes = 4;

  int32_t lookup(std::string_view piece) const {
    const int id = sp.PieceToId(piece);  // <unk>'s id when absent
    return id >= 0 && id < static_cast<int>(types.size()) && sp.IdToPiece(id) == piece ? id : -1;
  }

  Status encode_plain_ref(std::string_view text, std::vector<int32_t>& out) const {
    if (text.empty()) return ok_status();
    std::vector<int> ids;
    const sentencepiece::util::Status st = sp.Encode(text, &ids);
    if (!st.ok())
      return internal_error(fmt::format("tokenizer: sentencepiece Encode failed: {}", st.ToString()));
    out.insert(out.end(), ids.begin(), ids.end());
    return ok_status();
  }

  // Splits text at control-piece text (with parse_special) and appends the ids of the plain
  // segments from `plain`, the control ids in between.
  template <typename Plain>
  Result<std::vector<int32_t>> encode_with(std::string_view text, bool parse_special, Plain&& plain) const;

  // Loads the (already repaired) model into SentencePiece and derives the lookup tables.
  // `pieces` in id order; `other_fields` the ModelProto's trainer/normalizer spec bytes.
  static Result<std::shared_ptr<const Impl>> load(const std::vector<spm::Piece>& pieces,
                                                  std::string_view other_fields) {
    auto impl = std::make_shared<Impl>();
    const sentencepiece::util::Status st =
        impl->sp.LoadFromSerializedProto(spm::serialize_model_proto(pieces, other_fields));
    if (!st.ok()) return invalid_file(fmt::format("sentencepiece rejected the model: {}", st.ToString()));
    if (impl->sp.GetPieceSize() != static_cast<int>(pieces.size())) {
      return internal_error(
          fmt::format("sentencepiece loaded {} pieces, expected {}", impl->sp.GetPieceSize(), pieces.size()));
    }
    impl->types.resize(pieces.size());
    for (size_t i = 0; i < pieces.size(); ++i) {
      const spm::Piece& p = pieces[i];
      if (p.piece.empty()) return invalid_file(fmt::format("piece {} is empty", i));
      impl->types[i] = p.type;
      if (p.type == PieceType::kByte && parse_byte_piece(p.piece) < 0) {
        return invalid_file(fmt::format("BYTE piece {} is {:?}, expected <0xHH>", i, p.piece));
      }
      if (p.type == PieceType::kNormal || p.type == PieceType::kUserDefined || p.type == PieceType::kUnused) {
        impl->max_piece_bytes = std::max(impl->max_piece_bytes, static_cast<int>(p.piece.size()));
      }
      if (p.type == PieceType::kControl || p.type == PieceType::kUnknown) {
        impl->max_piece_bytes = std::max(impl->max_piece_bytes, static_cast<int>(p.piece.size()));
        impl->special_ids.emplace(p.piece, static_cast<int32_t>(i));  // first id wins on duplicates
        impl->special_first[static_cast<uint8_t>(p.piece[0])] = true;
        if (std::find(impl->special_lengths.begin(), impl->special_lengths.end(), p.piece.size()) ==
            impl->special_lengths.end()) {
          impl->special_lengths.push_back(p.piece.size());
        }
      }
    }
    std::sort(impl->special_lengths.rbegin(), impl->special_lengths.rend());

    // Special ids by piece text, not hard-coded (Gemma 3: <bos> 2, <eos> 1, 105, 106).
    impl->bos = impl->lookup("<bos>");
    impl->eos = impl->lookup("<eos>");
    impl->sot = impl->lookup("<start_of_turn>");
    impl->eot = impl->lookup("<end_of_turn>");
    if (impl->bos < 0 || impl->eos < 0) {
      return invalid_file(fmt::format("vocabulary lacks {}", impl->bos < 0 ? "\"<bos>\"" : "\"<eos>\""));
    }

    // The built-in BPE, when it reproduces this model; otherwise encode() calls the library.
    Result<spm::EncodingSpec> spec = spm::parse_encoding_spec(other_fields);
    if (!spec.ok()) {
      impl->bpe_unsupported = spec.status().message();
    } else if (auto bpe = BpeEncoder::build(pieces, *spec); bpe.ok()) {
      impl->bpe = std::move(bpe).value();
    } else {
      impl->bpe_unsupported = bpe.status().message();
    }
    return std::shared_ptr<const Impl>(std::move(impl));
  }
};

Tokenizer::Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}

Tokenizer::Tokenizer() = default;
Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(const Tokenizer&) = default;
Tokenizer& Tokenizer::operator=(const Tokenizer&) = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

Result<Tokenizer> Tokenizer::from_vocab(const std::vector<std::string>& pieces,
                                        const std::vector<float>& scores, const std::vector<int32_t>& types) {
  const std::string where = "tokenizer vocabulary";
  if (pieces.empty()) return invalid_file(where + ": no pieces (tokenizer.ggml.tokens is empty)");
  if (pieces.size() > kMaxVocab) {
    return invalid_file(
        fmt::format("{}: {} pieces, more than the limit of {}", where, pieces.size(), kMaxVocab));
  }
  if (scores.size() != pieces.size() || types.size() != pieces.size()) {
    return invalid_file(fmt::format("{}: {} pieces but {} scores and {} types (expected equal counts)", where,
                                    pieces.size(), scores.size(), types.size()));
  }
  std::vector<spm::Piece> spm_pieces(pieces.size());
  bool has_bytes = false;
  for (size_t i = 0; i < pieces.size(); ++i) {
    if (types[i] < 1 || types[i] > 6) {
      return invalid_file(fmt::format("{}: piece {} ({:?}) has type {}, expected 1..6 (NORMAL..BYTE)", where,
                                      i, pieces[i], types[i]));
    }
    if (pieces[i].empty()) return invalid_file(fmt::format("{}: piece {} is empty", where, i));
    spm::Piece& p = spm_pieces[i];
    p.type = static_cast<PieceType>(types[i]);
    p.score = scores[i];
    p.piece = p.type == PieceType::kUserDefined ? replace_all(pieces[i], " ", kSpaceSymbol) : pieces[i];
    if (p.type == PieceType::kByte) {
      if (parse_byte_piece(p.piece) < 0) {
        return invalid_file(fmt::format("{}: BYTE piece {} is {:?}, expected <0xHH>", where, i, p.piece));
      }
      has_bytes = true;
    }
  }
  repair_types(spm_pieces);

  spm::TrainerSpec trainer;
  trainer.vocab_size = static_cast<int32_t>(spm_pieces.size());
  trainer.byte_fallback = has_bytes;  // SentencePiece rejects BYTE pieces without it
  auto id_of = [&](std::string_view s, PieceType t) -> int32_t {
    for (size_t i = 0; i < spm_pieces.size(); ++i) {
      if (spm_pieces[i].type == t && spm_pieces[i].piece == s) return static_cast<int32_t>(i);
    }
    return -1;
  };
  for (size_t i = 0; i < spm_pieces.size(); ++i) {
    if (spm_pieces[i].type == PieceType::kUnknown) {
      trainer.unk_id = static_cast<int32_t>(i);
      trainer.unk_piece = spm_pieces[i].piece;
      break;
    }
  }
  if (trainer.unk_id < 0) return invalid_file(where + ": no UNKNOWN piece and no \"<unk>\" piece");
  trainer.bos_id = id_of("<bos>", PieceType::kControl);
  trainer.eos_id = id_of("<eos>", PieceType::kControl);
  trainer.pad_id = id_of("<pad>", PieceType::kControl);

  auto impl = Impl::load(spm_pieces, spm::serialize_spec_fields(trainer, spm::NormalizerSpec{}));
  if (!impl.ok()) return impl.status().with_context(where);
  return Tokenizer(std::move(impl).value());
}

Result<Tokenizer> Tokenizer::from_serialized_proto(const std::string& bytes) {
  Result<spm::ParsedModelProto> parsed = spm::parse_model_proto(bytes);
  if (!parsed.ok()) return parsed.status();
  spm::ParsedModelProto& m = parsed.value();
  if (m.pieces.empty()) return invalid_file("SentencePiece model: no pieces");
  if (m.pieces.size() > kMaxVocab) {
    return invalid_file(
        fmt::format("SentencePiece model: {} pieces, more than the limit of {}", m.pieces.size(), kMaxVocab));
  }
  repair_types(m.pieces);
  auto impl = Impl::load(m.pieces, m.other_fields);
  if (!impl.ok()) return impl.status().with_context("SentencePiece model");
  return Tokenizer(std::move(impl).value());
}

Result<Tokenizer> Tokenizer::from_model_file(const std::string& path) {
  GEMMA3_ASSIGN_OR_RETURN(MappedFile file, MappedFile::open(path));
  Result<Tokenizer> t =
      from_serialized_proto(std::string(reinterpret_cast<const char*>(file.data()), file.size()));
  if (!t.ok()) return t.status().with_context(path);
  return t;
}

template <typename Plain>
Result<std::vector<int32_t>> Tokenizer::Impl::encode_with(std::string_view text, bool parse_special,
                                                          Plain&& plain) const {
  if (const size_t bad = find_invalid_utf8(text); bad != std::string_view::npos) {
    // SentencePiece would silently turn the bad byte into U+FFFD; we refuse instead so that the
    // caller sees which input is broken.
    return invalid_argument(
        fmt::format("tokenizer: input is not valid UTF-8 at byte {} of {} (byte 0x{:02X})", bad, text.size(),
                    static_cast<uint8_t>(text[bad])));
  }
  std::vector<int32_t> ids;
  // One allocation for nearly any text (English ~4.5 bytes per id, code and logs ~2.5): the
  // pages past the last id are never touched, so they cost address space, not memory.
  ids.reserve(text.size() / 2 + 1);
  if (!parse_special || special_ids.empty()) {
    GEMMA3_TRY(plain(text, ids));
    return ids;
  }
  // Leftmost-longest match of control-piece text; the text between matches is plain.
  size_t plain_start = 0, i = 0;
  while (i < text.size()) {
    int32_t match_id = -1;
    size_t match_len = 0;
    if (special_first[static_cast<uint8_t>(text[i])]) {
      for (size_t len : special_lengths) {
        if (len > text.size() - i) continue;
        auto it = special_ids.find(text.substr(i, len));
        if (it != special_ids.end()) {
          match_id = it->second, match_len = len;
          break;
        }
      }
    }
    if (match_id < 0) {
      ++i;
      continue;
    }
    GEMMA3_TRY(plain(text.substr(plain_start, i - plain_start), ids));
    ids.push_back(match_id);
    i += match_len;
    plain_start = i;
  }
  GEMMA3_TRY(plain(text.substr(plain_start), ids));
  return ids;
}

Result<std::vector<int32_t>> Tokenizer::encode(std::string_view text, bool parse_special) const {
  if (!impl_) return invalid_argument("tokenizer: encode on an empty (not loaded) Tokenizer");
  if (!impl_->bpe) return encode_ref(text, parse_special);
  BpeEncoder::ScratchPtr scratch = BpeEncoder::new_scratch(text.size());
  return impl_->encode_with(text, parse_special, [&](std::string_view plain, std::vector<int32_t>& ids) {
    impl_->bpe->encode(plain, *scratch, ids);
    return ok_status();
  });
}

Result<std::vector<int32_t>> Tokenizer::encode_ref(std::string_view text, bool parse_special) const {
  if (!impl_) return invalid_argument("tokenizer: encode on an empty (not loaded) Tokenizer");
  return impl_->encode_with(text, parse_special, [&](std::string_view plain, std::vector<int32_t>& ids) {
    return impl_->encode_plain_ref(plain, ids);
  });
}

std::string_view Tokenizer::encode_fallback_reason() const {
  if (!impl_) return "no tokenizer loaded";
  return impl_->bpe_unsupported;
}

int Tokenizer::max_piece_bytes() const { return impl_ ? impl_->max_piece_bytes : 0; }

std::string Tokenizer::sentencepiece_model_proto() const {
  return impl_ ? std::string(impl_->sp.serialized_model_proto()) : std::string();
}

std::string Tokenizer::decode(int32_t id) const {
  if (!impl_ || id < 0 || id >= n_vocab()) return {};  // no bytes for an id outside the vocabulary
  const std::string& piece = impl_->sp.IdToPiece(id);
  switch (impl_->types[id]) {
    case PieceType::kControl:
    case PieceType::kUnknown:
    case PieceType::kUnused: return {};
    case PieceType::kByte: return std::string(1, static_cast<char>(parse_byte_piece(piece)));
    case PieceType::kNormal:
    case PieceType::kUserDefined: return replace_all(piece, kSpaceSymbol, " ");
  }
  return {};
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string out;
  for (int32_t id : ids) out += decode(id);
  return out;
}

int32_t Tokenizer::n_vocab() const { return impl_ ? static_cast<int32_t>(impl_->types.size()) : 0; }

std::string_view Tokenizer::piece(int32_t id) const {
  if (!impl_ || id < 0 || id >= n_vocab()) return {};
  return impl_->sp.IdToPiece(id);
}

PieceType Tokenizer::type(int32_t id) const {
  // An id outside the vocabulary behaves like an unused slot: it decodes to nothing.
  if (!impl_ || id < 0 || id >= n_vocab()) return PieceType::kUnused;
  return impl_->types[id];
}

std::optional<int32_t> Tokenizer::find(std::string_view piece) const {
  if (!impl_) return std::nullopt;
  const int32_t id = impl_->lookup(piece);
  return id < 0 ? std::nullopt : std::optional<int32_t>(id);
}

int32_t Tokenizer::bos_id() const { return impl_ ? impl_->bos : -1; }
int32_t Tokenizer::eos_id() const { return impl_ ? impl_->eos : -1; }
int32_t Tokenizer::start_of_turn_id() const { return impl_ ? impl_->sot : -1; }
int32_t Tokenizer::end_of_turn_id() const { return impl_ ? impl_->eot : -1; }

}  // namespace gemma3
