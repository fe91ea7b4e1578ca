// libFuzzer target: the tokenizer. The first input byte picks what the rest is:
//   0: text for encode(parse_special=false), then decode; for text without U+2581 ("▁", which
//      SentencePiece itself turns into a space) decode(encode(x)) must give x back (identity
//      normalizer, no dummy prefix, byte fallback: Gemma 3 tokenization is lossless);
//   1: text for encode(parse_special=true), then decode;
//   in both, encode (the built-in BPE) must equal encode_ref (the SentencePiece library);
//   2: a serialized SentencePiece ModelProto for spm::parse_model_proto (our wire-format
//      reader), re-serialized and parsed again: same pieces;
//   3: a serialized ModelProto for Tokenizer::from_serialized_proto (what tokenizer.model goes
//      through), then a short encode.
// Text is encoded with the tiny test tokenizer (tests/data/tiny/tokenizer.model, 512 pieces,
// Gemma 3's control and byte pieces). Invalid UTF-8 must be an error, not a crash.
#include <cstdint>
#include <string>
#include <string_view>

#include "fuzz_common.h"
#include "gemma3/tokenizer.h"
#include "text/spm_proto.h"

namespace {

const gemma3::Tokenizer* g_tok = nullptr;

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const std::string path = std::string(GEMMA3_SOURCE_DIR) + "/tests/data/tiny/tokenizer.model";
  auto tok = gemma3::Tokenizer::from_model_file(path);
  if (!tok.ok()) {
    std::fprintf(stderr, "fuzz_tokenizer: cannot load %s: %s\n", path.c_str(),
                 tok.status().to_string().c_str());
    std::abort();
  }
  g_tok = new gemma3::Tokenizer(std::move(tok).value());
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const int mode = data[0] & 3;
  const std::string_view rest(reinterpret_cast<const char*>(data + 1), size - 1);
  switch (mode) {
    case 0:
    case 1: {
      const bool special = mode == 1;
      auto ids = g_tok->encode(rest, special);
      if (!ids.ok()) {
        FUZZ_CHECK(ids.status().code() == gemma3::ErrorCode::kInvalidArgument);
        return 0;
      }
      auto ref = g_tok->encode_ref(rest, special);
      FUZZ_CHECK(ref.ok() && *ref == *ids);
      for (int32_t id : *ids) FUZZ_CHECK(id >= 0 && id < g_tok->n_vocab());
      const std::string back = g_tok->decode(*ids);
      if (!special && rest.find("\xE2\x96\x81") == std::string_view::npos) FUZZ_CHECK(back == rest);
      return 0;
    }
    case 2: {
      auto m = gemma3::spm::parse_model_proto(rest);
      if (!m.ok()) return 0;
      const std::string again = gemma3::spm::serialize_model_proto(m->pieces, m->other_fields);
      auto m2 = gemma3::spm::parse_model_proto(again);
      FUZZ_CHECK(m2.ok());
      FUZZ_CHECK(m2->pieces.size() == m->pieces.size());
      FUZZ_CHECK(m2->other_fields == m->other_fields);
      for (size_t i = 0; i < m->pieces.size(); ++i) {
        FUZZ_CHECK(m2->pieces[i].piece == m->pieces[i].piece);
        FUZZ_CHECK(m2->pieces[i].type == m->pieces[i].type);
      }
      return 0;
    }
    default: {
      auto tok = gemma3::Tokenizer::from_serialized_proto(std::string(rest));
      if (!tok.ok()) return 0;
      FUZZ_CHECK(tok->bos_id() >= 0 && tok->bos_id() < tok->n_vocab());
      auto ids = tok->encode("Hi <end_of_turn>\n\xC3\xA9", /*parse_special=*/true);
      if (ids.ok()) (void)tok->decode(*ids);
      return 0;
    }
  }
}
