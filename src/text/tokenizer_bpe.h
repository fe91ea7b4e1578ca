// The built-in SentencePiece BPE encoder behind Tokenizer::encode: the same ids as
// sentencepiece::SentencePieceProcessor::Encode (bpe_model.cc) on the same ModelProto, 15-60x
// faster on prose, and beyond the ids a working set of at most 4 MB plus ~35 bytes per byte
// of the longest chunk (docs/perf.md, "Tokenizer") instead of ~100 bytes per input byte.
//
// What SentencePiece does with a plain text (identity normalizer, no dummy prefix): replace
// each ' ' by "▁", cut the result into characters (a USER_DEFINED piece matched at a position,
// longest first, is one frozen symbol instead), then repeatedly merge the adjacent pair of
// symbols whose concatenation is the piece with the highest score (ties: leftmost), until no
// pair is a piece; a final symbol that is not a piece becomes its UTF-8 bytes' <0xHH> pieces
// (byte fallback) or <unk>. It does this on the whole text at once: one heap with an entry per
// character, so a 47 MB text is one 47M-symbol problem (cache misses on every heap step).
//
// We run the same algorithm on independent chunks. A merge creates a piece, so a symbol can
// only ever span the point between two adjacent characters a and b if some piece contains
// "ab"; at load we collect, for every character, the characters that precede / follow it
// inside some piece, and cut the text only where no piece has "ab" (Gemma 3: before a space
// unless after a space or ">", around runs of "\n" and of "\t", ...). Within a chunk the merges
// happen in the same order as in the whole text (ties are broken by position, which the chunk
// keeps), so the ids are identical. A chunk's ids depend only on its bytes, so frequent
// chunks (words) come from a small per-call cache. A text without any cut point (megabytes
// of letters with no space or newline) is one chunk, as slow as the library's whole text.
//
// Vocabularies whose behaviour we do not reproduce are refused by build(), naming why, and the
// tokenizer then calls the library: another normalizer or model type, UNUSED pieces a merge
// could produce (re-split by a whole-text choice), a merge target with a CONTROL piece's text
// or a one-character CONTROL piece (the library fails those texts), USER_DEFINED pieces with
// a space, pieces with NUL bytes or invalid UTF-8, NaN scores, more than 64 nested
// USER_DEFINED prefixes, 2^22 pieces or a piece of 1024 bytes.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "gemma3/status.h"
#include "text/spm_proto.h"

namespace gemma3 {

class BpeEncoder {
 public:
  // Per-call scratch (symbols, heap, chunk cache), reused across the segments of one encode().
  struct Scratch;
  struct ScratchDeleter {
    void operator()(Scratch* s) const;
  };
  using ScratchPtr = std::unique_ptr<Scratch, ScratchDeleter>;
  static ScratchPtr new_scratch(size_t text_bytes);

  // `pieces` in id order with their final (repaired) types; `spec` as the ModelProto says.
  // kUnsupported names what this encoder cannot reproduce.
  static Result<std::unique_ptr<const BpeEncoder>> build(const std::vector<spm::Piece>& pieces,
                                                         const spm::EncodingSpec& spec);
  ~BpeEncoder();

  // Appends the ids of `text` (valid UTF-8, no control-token parsing) to `out`.
  void encode(std::string_view text, Scratch& scratch, std::vector<int32_t>& out) const;

 private:
  struct Tables;
  explicit BpeEncoder(std::unique_ptr<Tables> t);
  void encode_chunk(std::string_view raw, Scratch& s, std::vector<int32_t>& out) const;
  void bpe(Scratch& s, std::vector<int32_t>& out) const;
  // A merge target's id and score, or -1; p points into Scratch::norm (read up to 8 bytes).
  int32_t find_piece(const char* p, size_t n, float* score) const;
  std::unique_ptr<Tables> t_;
};

}  // namespace gemma3
