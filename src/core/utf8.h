// UTF-8 validation shared by the tokenizer (library) and the CLI.
#pragma once

#include <cstddef>
#include <string_view>

namespace gemma3 {

// Byte offset of the first invalid UTF-8 sequence (overlong forms, surrogates and code points
// above U+10FFFF are invalid), or std::string_view::npos when `s` is valid.
size_t find_invalid_utf8(std::string_view s);

}  // namespace gemma3
