// Streaming GGUF v3 writer (docs/formats.md §2.1). Metadata and tensor infos are declared first;
// write() then emits the header and asks a callback for each tensor's bytes in declaration
// order, so multi-GB files are produced without holding the tensors in memory.
//
// The writer checks only what it needs to lay the file out (tensor shapes vs block size). It
// writes tensor infos verbatim, which lets tests craft deliberately invalid files by editing
// mutable_tensors() or adding raw key-value pairs.
#pragma once

#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "checkpoint/gguf.h"
#include "core/dtype.h"
#include "gemma3/status.h"

namespace gemma3 {

// Where a tensor callback writes its bytes. Buffered; counts what was written.
class GgufSink {
 public:
  Status write(const void* data, size_t n);
  uint64_t bytes_written() const { return written_; }

 private:
  friend class GgufWriter;
  GgufSink(std::FILE* f, const std::string* path) : f_(f), path_(path) {}
  std::FILE* f_;
  const std::string* path_;
  uint64_t written_ = 0;
};

class GgufWriter {
 public:
  struct TensorInfo {
    std::string name;
    DType dtype = DType::kF32;
    std::vector<int64_t> shape;  // HF order, as declared
    // Written verbatim into the tensor info (tests may edit these to make bad files):
    uint32_t ggml_type = 0;
    std::vector<uint64_t> ne;  // GGUF order (shape reversed)
    uint64_t offset = 0;       // relative to the data section; packed, ALIGNMENT-aligned
    // Bytes the data callback must produce for this tensor.
    uint64_t nbytes = 0;
  };
  // Produces exactly info.nbytes bytes of tensor `index` into the sink.
  using TensorDataFn = std::function<Status(size_t index, const TensorInfo& info, GgufSink& sink)>;

  GgufWriter() = default;

  // GGUF version in the header (3; tests write 1/2 to exercise the reader).
  void set_version(uint32_t version) { version_ = version; }
  // Data alignment; also stores general.alignment (UINT32). Call before add_tensor.
  void set_alignment(uint32_t alignment);
  uint32_t alignment() const { return alignment_; }

  // Metadata setters replace an existing key's value in place, or append a new key.
  void set_u8(std::string_view key, uint8_t v);
  void set_i8(std::string_view key, int8_t v);
  void set_u16(std::string_view key, uint16_t v);
  void set_i16(std::string_view key, int16_t v);
  void set_u32(std::string_view key, uint32_t v);
  void set_i32(std::string_view key, int32_t v);
  void set_u64(std::string_view key, uint64_t v);
  void set_i64(std::string_view key, int64_t v);
  void set_f32(std::string_view key, float v);
  void set_f64(std::string_view key, double v);
  void set_bool(std::string_view key, bool v);
  void set_string(std::string_view key, std::string_view v);
  void set_string_array(std::string_view key, const std::vector<std::string>& v);
  void set_f32_array(std::string_view key, const std::vector<float>& v);
  void set_i32_array(std::string_view key, const std::vector<int32_t>& v);
  void set_u32_array(std::string_view key, const std::vector<uint32_t>& v);
  void set_bool_array(std::string_view key, const std::vector<bool>& v);
  // Any value given as its type tag and encoded payload (after the tag), replacing or
  // appending like the setters.
  void set_raw(std::string_view key, uint32_t type_tag, std::vector<uint8_t> payload);
  // Always appends, even if the key exists or is empty (tests: duplicate/empty keys).
  void add_raw_kv(std::string_view key, uint32_t type_tag, std::vector<uint8_t> payload);
  bool remove_key(std::string_view key);
  size_t kv_count() const { return kvs_.size(); }

  // Declares a tensor; shape in HF order (slowest first), 1..4 dims, last dim a multiple of
  // the block size. Its offset is assigned packed after the previous tensor.
  Status add_tensor(std::string_view name, DType dtype, const std::vector<int64_t>& shape);
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  // For tests that need a malformed tensor info. Data is still written in declaration order:
  // tensor i goes at its offset if that is at or past the current end, otherwise right after
  // the previous tensor.
  std::vector<TensorInfo>& mutable_tensors() { return tensors_; }

  // Writes the file (via `path.tmp`, renamed on success so no half-written file is left).
  Status write(const std::string& path, const TensorDataFn& data) const;
  // Convenience for small files: data[i] holds the bytes of tensor i.
  Status write(const std::string& path, const std::vector<std::vector<uint8_t>>& data) const;

 private:
  struct Kv {
    std::string key;
    uint32_t tag;
    std::vector<uint8_t> payload;
  };

  uint32_t version_ = 3;
  uint32_t alignment_ = kGgufDefaultAlignment;
  std::vector<Kv> kvs_;
  std::vector<TensorInfo> tensors_;
};

}  // namespace gemma3
