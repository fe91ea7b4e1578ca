// Small text and file utilities that the library uses itself and that programs built on it
// need too (the CLI, a server): UTF-8 validation, which is what Tokenizer::encode and the chat
// template accept, and bounded reads of files and lines, which never throw.
//
// Thread safety: every function here may be called from any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <istream>
#include <string>
#include <string_view>

#include "gemma3/status.h"

namespace gemma3 {

// Byte offset of the first invalid UTF-8 sequence (overlong forms, surrogates and code points
// above U+10FFFF are invalid), or std::string_view::npos when `s` is valid.
size_t find_invalid_utf8(std::string_view s);

enum class FileKind {
  kRegular,  // regular files only (a prompt cache, an image: their size is checked up front)
  kStream,   // also pipes and character devices (-f /dev/stdin), read until the limit
};

// The bytes of `path`, at most max_bytes of them. `what` names the file in messages
// ("prompt cache", "prompt file", "image"). Errors: kNotFound when it does not exist;
// kInvalidFile for a directory or another kind of file, or a read error; over the limit,
// `over_limit` (kOutOfRange for text that cannot fit a context, kInvalidFile for an image)
// with a message naming the size and the limit.
//
// std::ifstream throws std::ios_base::failure from a read error (a directory: EISDIR;
// /proc/self/mem: EIO), never stops on /dev/zero and reports neither as an error; this call
// uses POSIX open/fstat/read instead.
Result<std::string> read_file_limited(const std::string& path, uint64_t max_bytes, std::string_view what,
                                      FileKind kind, ErrorCode over_limit = ErrorCode::kOutOfRange);

// One line (without its '\n') from `in`, reading at most max_bytes of it. Returns false at end
// of input; a line longer than max_bytes sets *too_long (the rest of that line is not read).
bool read_line_limited(std::istream& in, std::string& line, size_t max_bytes, bool* too_long);

}  // namespace gemma3
