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

// Roles: "user", "model" ("assistant" is renamed to "model"), and "system" only as the first
// message, whose content (not trimmed, as in the template) plus "\n\n" is prepended to the
// first user message. User/model content is trimmed of leading and trailing whitespace (Python
// str.strip's whitespace set, as Jinja's `trim` uses). After an optional system message the roles
// must alternate user, model, user, ... (an invalid-argument error otherwise).
//
// Model content may hold any bytes: a reply as generate() streamed it can end inside a UTF-8
// character (cut by max_tokens, or a byte token of an emoji), and bytes that are not
// well-formed UTF-8 are rendered as their "<0xNN>" byte pieces, so re-rendering a conversation
// (feed_chat_truncating) never fails on what the model wrote. User and system content must be
// valid UTF-8 (the tokenizer's error otherwise).
//
// add_bos = false renders a continuation: the next turns of a session that already holds
// earlier ones (ending in "<end_of_turn>\n" or with a model reply just generated). Rendering
// [m0..mk] with add_bos and then [mk+1..mn] without it gives the same ids as rendering
// [m0..mn] at once when mk is a model turn. A continuation must start with a user message
// and may not contain a system message.
//
// Images: a user message with images gets one image slot per "<start_of_image>" marker in its
// content (their count must equal images.size()), or, with no markers, one slot per image at
// the start of the text (where the HF template puts image items that precede the text). The
// text between slots is encoded piece by piece, so nothing merges across an image. Slot k's
// position (index into the returned ids where image k's block goes, in message order) is
// appended to *image_slots; images with image_slots == nullptr are an error.
Result<std::vector<int32_t>> render_chat(const Tokenizer& tokenizer, const std::vector<ChatMessage>& messages,
                                         bool add_bos, bool add_generation_prompt,
                                         std::vector<size_t>* image_slots = nullptr);

}  // namespace gemma3
