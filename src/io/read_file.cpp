#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "gemma3/util.h"

namespace gemma3 {

Result<std::string> read_file_limited(const std::string& path, uint64_t max_bytes, std::string_view what,
                                      FileKind kind, ErrorCode over_limit) {
  auto too_big = [&](const std::string& size) {
    return Status(over_limit,
                  fmt::format("{} '{}' is {} bytes, more than the {} allowed", what, path, size, max_bytes));
  };
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    const int err = errno;
    return Status(err == ENOENT ? ErrorCode::kNotFound : ErrorCode::kInvalidFile,
                  fmt::format("{} '{}': cannot open: {}", what, path, std::strerror(err)));
  }
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0)
    return invalid_file(fmt::format("{} '{}': cannot stat: {}", what, path, std::strerror(errno)));
  const bool regular = S_ISREG(st.st_mode);
  if (S_ISDIR(st.st_mode)) return invalid_file(fmt::format("{} '{}' is a directory, not a file", what, path));
  if (!regular && (kind == FileKind::kRegular || !(S_ISFIFO(st.st_mode) || S_ISCHR(st.st_mode))))
    return invalid_file(fmt::format("{} '{}' is not a regular file", what, path));
  if (regular && static_cast<uint64_t>(st.st_size) > max_bytes) return too_big(std::to_string(st.st_size));
  // Opened non-blocking so a FIFO without a writer cannot hang open(); reads block again.
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags >= 0) (void)::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);

  std::string out;
  if (regular) out.reserve(static_cast<size_t>(st.st_size));
  char buf[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      return invalid_file(fmt::format("{} '{}': read error after {} bytes: {}", what, path, out.size(),
                                      std::strerror(errno)));
    }
    if (n == 0) break;
    if (out.size() + static_cast<uint64_t>(n) > max_bytes) return too_big(fmt::format("over {}", max_bytes));
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

bool read_line_limited(std::istream& in, std::string& line, size_t max_bytes, bool* too_long) {
  line.clear();
  *too_long = false;
  std::streambuf* sb = in.rdbuf();
  bool any = false;
  for (;;) {
    const int c = sb->sbumpc();
    if (c == std::char_traits<char>::eof()) {
      in.setstate(std::ios::eofbit);
      return any;
    }
    any = true;
    if (c == '\n') return true;
    if (line.size() >= max_bytes) {
      *too_long = true;
      return true;
    }
    line.push_back(static_cast<char>(c));
  }
}

}  // namespace gemma3
