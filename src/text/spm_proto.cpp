#include "text/spm_proto.h"

#include <fmt/format.h>

#include <cstring>

namespace gemma3::spm {
namespace {

// Protobuf wire types.
constexpr uint32_t kVarint = 0;
constexpr uint32_t kFixed64 = 1;
constexpr uint32_t kLengthDelimited = 2;
constexpr uint32_t kFixed32 = 5;

void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}

void put_tag(std::string& out, uint32_t field, uint32_t wire_type) {
  put_varint(out, (field << 3) | wire_type);
}

// int32 fields are varints of the sign-extended 64-bit value (negative ids take 10 bytes).
void put_int32(std::string& out, uint32_t field, int32_t v) {
  put_tag(out, field, kVarint);
  put_varint(out, static_cast<uint64_t>(static_cast<int64_t>(v)));
}

void put_bool(std::string& out, uint32_t field, bool v) {
  put_tag(out, field, kVarint);
  put_varint(out, v ? 1 : 0);
}

void put_float(std::string& out, uint32_t field, float v) {
  put_tag(out, field, kFixed32);
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((bits >> (8 * i)) & 0xff));  // little-endian
}

void put_bytes(std::string& out, uint32_t field, std::string_view bytes) {
  put_tag(out, field, kLengthDelimited);
  put_varint(out, bytes.size());
  out.append(bytes);
}

std::string serialize_piece(const Piece& p) {
  std::string m;
  put_bytes(m, 1, p.piece);
  put_float(m, 2, p.score);
  put_int32(m, 3, static_cast<int32_t>(p.type));
  return m;
}

std::string serialize_trainer_spec(const TrainerSpec& t) {
  std::string m;
  put_int32(m, 3, t.model_type);
  put_int32(m, 4, t.vocab_size);
  put_bool(m, 21, t.split_by_unicode_script);
  put_bool(m, 22, t.split_by_whitespace);
  put_bool(m, 23, t.split_by_number);
  put_bool(m, 24, t.treat_whitespace_as_suffix);
  put_bool(m, 25, t.split_digits);
  put_bool(m, 26, t.allow_whitespace_only_pieces);
  put_bool(m, 35, t.byte_fallback);
  put_int32(m, 40, t.unk_id);
  put_int32(m, 41, t.bos_id);
  put_int32(m, 42, t.eos_id);
  put_int32(m, 43, t.pad_id);
  put_bytes(m, 45, t.unk_piece);
  put_bytes(m, 46, t.bos_piece);
  put_bytes(m, 47, t.eos_piece);
  put_bytes(m, 48, t.pad_piece);
  return m;
}

std::string serialize_normalizer_spec(const NormalizerSpec& n) {
  std::string m;
  put_bytes(m, 1, n.name);
  put_bool(m, 3, n.add_dummy_prefix);
  put_bool(m, 4, n.remove_extra_whitespaces);
  put_bool(m, 5, n.escape_whitespaces);
  return m;
}

// Reads wire-format fields from a byte range; every read is bounds-checked.
class Reader {
 public:
  explicit Reader(std::string_view bytes) : p_(bytes) {}
  bool done() const { return pos_ >= p_.size(); }
  size_t pos() const { return pos_; }

  Result<uint64_t> varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (pos_ >= p_.size()) return invalid_file(fmt::format("truncated varint at byte {}", pos_));
      const uint8_t b = static_cast<uint8_t>(p_[pos_++]);
      v |= static_cast<uint64_t>(b & 0x7f) << shift;
      if (!(b & 0x80)) return v;
    }
    return invalid_file(fmt::format("varint longer than 10 bytes before byte {}", pos_));
  }

  Result<std::string_view> take(uint64_t n) {
    if (n > p_.size() - pos_) {
      return invalid_file(
          fmt::format("field of {} bytes at byte {} runs past the end ({} bytes)", n, pos_, p_.size()));
    }
    std::string_view s = p_.substr(pos_, n);
    pos_ += n;
    return s;
  }

  // Skips the value of a field with the given wire type.
  Status skip(uint32_t wire_type) {
    switch (wire_type) {
      case kVarint: {
        GEMMA3_ASSIGN_OR_RETURN(uint64_t v, varint());
        (void)v;
        return ok_status();
      }
      case kFixed64: return take(8).status();
      case kFixed32: return take(4).status();
      case kLengthDelimited: {
        GEMMA3_ASSIGN_OR_RETURN(uint64_t n, varint());
        return take(n).status();
      }
      default:
        return invalid_file(fmt::format("unsupported protobuf wire type {} before byte {}", wire_type, pos_));
    }
  }

 private:
  std::string_view p_;
  size_t pos_ = 0;
};

Result<Piece> parse_piece(std::string_view bytes) {
  Piece p;
  Reader r(bytes);
  while (!r.done()) {
    GEMMA3_ASSIGN_OR_RETURN(uint64_t tag, r.varint());
    const uint32_t field = static_cast<uint32_t>(tag >> 3), wire = static_cast<uint32_t>(tag & 7);
    if (field == 1 && wire == kLengthDelimited) {
      GEMMA3_ASSIGN_OR_RETURN(uint64_t n, r.varint());
      GEMMA3_ASSIGN_OR_RETURN(std::string_view s, r.take(n));
      p.piece.assign(s);
    } else if (field == 2 && wire == kFixed32) {
      GEMMA3_ASSIGN_OR_RETURN(std::string_view s, r.take(4));
      uint32_t bits = 0;
      for (int i = 0; i < 4; ++i) bits |= static_cast<uint32_t>(static_cast<uint8_t>(s[i])) << (8 * i);
      std::memcpy(&p.score, &bits, 4);
    } else if (field == 3 && wire == kVarint) {
      GEMMA3_ASSIGN_OR_RETURN(uint64_t t, r.varint());
      if (t < 1 || t > 6) return invalid_file(fmt::format("piece type {} is not in 1..6", t));
      p.type = static_cast<PieceType>(t);
    } else {
      GEMMA3_TRY(r.skip(wire));
    }
  }
  return p;
}

}  // namespace

std::string serialize_spec_fields(const TrainerSpec& trainer, const NormalizerSpec& normalizer) {
  std::string other;
  put_bytes(other, 2, serialize_trainer_spec(trainer));
  put_bytes(other, 3, serialize_normalizer_spec(normalizer));
  return other;
}

std::string serialize_model_proto(const std::vector<Piece>& pieces, const TrainerSpec& trainer,
                                  const NormalizerSpec& normalizer) {
  return serialize_model_proto(pieces, serialize_spec_fields(trainer, normalizer));
}

std::string serialize_model_proto(const std::vector<Piece>& pieces, std::string_view other_fields) {
  std::string out;
  out.reserve(pieces.size() * 24 + other_fields.size());
  for (const Piece& p : pieces) put_bytes(out, 1, serialize_piece(p));
  out.append(other_fields);
  return out;
}

Result<EncodingSpec> parse_encoding_spec(std::string_view other_fields) {
  EncodingSpec spec;
  Reader r(other_fields);
  while (!r.done()) {
    GEMMA3_ASSIGN_OR_RETURN(uint64_t tag, r.varint());
    const uint32_t field = static_cast<uint32_t>(tag >> 3), wire = static_cast<uint32_t>(tag & 7);
    if ((field != 2 && field != 3) || wire != kLengthDelimited) {
      GEMMA3_TRY(r.skip(wire));
      continue;
    }
    GEMMA3_ASSIGN_OR_RETURN(uint64_t n, r.varint());
    GEMMA3_ASSIGN_OR_RETURN(std::string_view message, r.take(n));
    Reader m(message);
    while (!m.done()) {
      GEMMA3_ASSIGN_OR_RETURN(uint64_t sub_tag, m.varint());
      const uint32_t f = static_cast<uint32_t>(sub_tag >> 3), w = static_cast<uint32_t>(sub_tag & 7);
      if (w == kVarint) {
        GEMMA3_ASSIGN_OR_RETURN(uint64_t v, m.varint());
        if (field == 2) {  // TrainerSpec
          if (f == 3) spec.model_type = static_cast<int32_t>(v);
          if (f == 24) spec.treat_whitespace_as_suffix = v != 0;
          if (f == 35) spec.byte_fallback = v != 0;
        } else {  // NormalizerSpec
          if (f == 3) spec.add_dummy_prefix = v != 0;
          if (f == 4) spec.remove_extra_whitespaces = v != 0;
          if (f == 5) spec.escape_whitespaces = v != 0;
        }
      } else if (field == 3 && f == 2 && w == kLengthDelimited) {
        GEMMA3_ASSIGN_OR_RETURN(uint64_t len, m.varint());
        GEMMA3_TRY(m.take(len).status());
        spec.has_precompiled_charsmap = len > 0;
      } else {
        GEMMA3_TRY(m.skip(w));
      }
    }
  }
  return spec;
}

Result<ParsedModelProto> parse_model_proto(std::string_view bytes) {
  ParsedModelProto m;
  Reader r(bytes);
  while (!r.done()) {
    const size_t field_start = r.pos();
    GEMMA3_ASSIGN_OR_RETURN(uint64_t tag, r.varint());
    const uint32_t field = static_cast<uint32_t>(tag >> 3), wire = static_cast<uint32_t>(tag & 7);
    if (field == 0) return invalid_file(fmt::format("ModelProto: field number 0 at byte {}", field_start));
    if (field == 1 && wire == kLengthDelimited) {
      GEMMA3_ASSIGN_OR_RETURN(uint64_t n, r.varint());
      GEMMA3_ASSIGN_OR_RETURN(std::string_view s, r.take(n));
      Result<Piece> p = parse_piece(s);
      if (!p.ok()) return p.status().with_context(fmt::format("ModelProto: piece {}", m.pieces.size()));
      m.pieces.push_back(std::move(p).value());
    } else {
      Status st = r.skip(wire);
      if (!st.ok()) return st.with_context(fmt::format("ModelProto: field {}", field));
      m.other_fields.append(bytes.substr(field_start, r.pos() - field_start));
    }
  }
  return m;
}

}  // namespace gemma3::spm
