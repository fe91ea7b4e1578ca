// The Gemma 3 instruction-tuned chat format, rendered directly as token ids
// (docs/architecture.md §4.3; the Jinja template in the published tokenizer_config.json):
//
//   <bos><start_of_turn>user\n{system}\n\n{user}<end_of_turn>\n
//   <start_of_turn>model\n{model}<end_of_turn>\n
//   ...
//   <start_of_turn>model\n                      <- add_generation_prompt
//
// <bos>, <start_of_turn> and <end_of_turn> are emitted as ids; the rest ("user\n", message
// text, "\n") is encoded with parse_special=false, so a message that contains the text
// "<end_of_turn>" cannot close its turn early.
#pragma once

#include <cstdint>
#include <vector>

#include "gemma3/gemma3.h"
#include "gemma3/status.h"
#include "gemma3/tokenizer.h"

namespace gemma3 {

// render_chat (declared in gemma3.h, the public API) renders this format.

}  // namespace gemma3
