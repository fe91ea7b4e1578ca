// Builds the Gemma 3 tokenizer from the vocabulary stored in a GGUF (docs/formats.md §4).
#pragma once

#include "checkpoint/gguf.h"
#include "gemma3/status.h"
#include "gemma3/tokenizer.h"

namespace gemma3 {

// Reads tokenizer.ggml.tokens / scores / token_type (and unknown/bos/eos ids when present) and
// rebuilds a SentencePiece model from them (Tokenizer::from_vocab). Requires
// tokenizer.ggml.model = "llama" (SentencePiece); errors name the file and key.
Result<Tokenizer> tokenizer_from_gguf(const GgufFile& gguf);

}  // namespace gemma3
