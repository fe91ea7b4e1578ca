// Shared helpers of the libFuzzer targets (fuzz/README.md).
//
// The GGUF and safetensors readers only open files by path (they mmap them), so the
// targets write each input to one scratch file per process and open that: a tmpfs write is a
// few microseconds, small next to the parse itself, and the entry point fuzzed is exactly the
// one a user calls.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

// Property violations are findings too: print and abort so libFuzzer saves the input.
#define FUZZ_CHECK(cond)                                                                  \
  do {                                                                                    \
    if (!(cond)) {                                                                        \
      std::fprintf(stderr, "FUZZ_CHECK failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__); \
      std::abort();                                                                       \
    }                                                                                     \
  } while (0)

namespace gemma3::fuzz {

// A per-process scratch path ending in `suffix`, in /dev/shm when it exists (no disk I/O),
// else $TMPDIR or /tmp. Removed at exit.
inline const std::string& scratch_path(const char* suffix) {
  static const std::string path = [&] {
    const char* dir = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : std::getenv("TMPDIR");
    std::string p = std::string(dir ? dir : "/tmp") + "/gemma3_fuzz_" + std::to_string(getpid()) + suffix;
    return p;
  }();
  static const bool registered = [] {
    std::atexit([] { unlink(path.c_str()); });
    return true;
  }();
  (void)registered;
  return path;
}

// Replaces the scratch file's contents with data[0, size). Aborts (a harness bug, not a
// finding in the library) when the write fails.
inline void write_file(const std::string& path, const uint8_t* data, size_t size) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) {
    std::perror(path.c_str());
    std::abort();
  }
  size_t done = 0;
  while (done < size) {
    ssize_t n = ::write(fd, data + done, size - done);
    if (n <= 0) {
      std::perror(path.c_str());
      std::abort();
    }
    done += static_cast<size_t>(n);
  }
  ::close(fd);
}

}  // namespace gemma3::fuzz
