// GGUF reader (docs/formats.md §2): parses metadata and tensor infos of a mapped file (or of all
// shards of a split GGUF) with bounds and overflow checks on every read, and exposes tensor
// data zero-copy as TensorViews into the mapping.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "core/tensor.h"
#include "gemma3/status.h"
#include "io/mapped_file.h"

namespace gemma3 {

// Metadata value type tags (docs/formats.md §2.2).
enum class GgufType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};

// "UINT32", "STRING", ...; "type 42" for tags outside the table.
std::string gguf_type_name(uint32_t tag);
// Byte size of a fixed-size scalar type; 0 for STRING, ARRAY and unknown tags.
uint64_t gguf_scalar_size(uint32_t tag);

// Magic as read as a little-endian u32 ("GGUF").
inline constexpr uint32_t kGgufMagic = 0x46554747;
inline constexpr uint32_t kGgufDefaultAlignment = 32;

class GgufFile {
 public:
  // Opens and validates a GGUF. If the file name matches `<prefix>-0000k-of-0000N.gguf`
  // (llama-gguf-split naming), all N shards are opened; metadata comes from shard 1 and the
  // tensors from all shards (split.count / split.tensors.count are checked).
  static Result<GgufFile> open(const std::string& path);

  GgufFile(GgufFile&&) noexcept = default;
  GgufFile& operator=(GgufFile&&) noexcept = default;

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint32_t alignment() const { return alignment_; }
  size_t shard_count() const { return shards_.size(); }

  bool has(std::string_view key) const;
  // Type of a key's value (kArray for arrays); error if missing.
  Result<GgufType> type_of(std::string_view key) const;
  Result<std::string> get_string(std::string_view key) const;
  Result<int64_t> get_int(std::string_view key) const;   // any integer type, widened (not BOOL)
  Result<double> get_float(std::string_view key) const;  // FLOAT32/FLOAT64 and integers
  Result<bool> get_bool(std::string_view key) const;
  Result<std::vector<std::string>> get_string_array(std::string_view key) const;
  Result<std::vector<float>> get_float_array(std::string_view key) const;  // float or int elems
  Result<std::vector<int64_t>> get_int_array(std::string_view key) const;  // int or BOOL (0/1)
  // Number of elements of an array value.
  Result<uint64_t> array_size(std::string_view key) const;

  // Keys in file order (shard 1).
  std::vector<std::string> keys() const;
  // Human-readable value, truncated to about max_len characters ("…" marks the cut):
  // `"gemma3"`, `640`, `[1, 2, 3, ...] (262144 elements)`. "<missing>" for unknown keys.
  std::string value_to_string(std::string_view key, size_t max_len = 80) const;

  // Every tensor of every shard, in file order. shape is HF order (ne reversed).
  const std::vector<TensorView>& tensors() const { return tensors_; }
  const TensorView* find_tensor(std::string_view name) const;

 private:
  GgufFile() = default;

  // One metadata value, pointing into the mapping (no copies: a 262144-entry token array
  // is only walked once for validation).
  struct Value {
    GgufType type = GgufType::kUint8;
    const uint8_t* payload = nullptr;       // scalar bytes / string length field / first array element
    uint64_t payload_bytes = 0;             // bytes of payload (array: all elements)
    GgufType elem_type = GgufType::kUint8;  // arrays only
    uint64_t count = 0;                     // arrays only: element count
  };
  struct Kv {
    std::string key;
    Value value;
  };
  struct Shard;  // parse state of one file

  static Result<GgufFile> open_single(MappedFile file);
  static Status parse_shard(const MappedFile& file, Shard* out);
  const Value* find_value(std::string_view key) const;
  Status type_error(std::string_view key, const Value& v, std::string_view expected) const;
  Status missing(std::string_view key) const;

  std::string path_;
  uint32_t version_ = 0;
  uint32_t alignment_ = kGgufDefaultAlignment;
  std::vector<MappedFile> shards_;  // keep every mapping alive; data pointers point into them
  std::vector<Kv> kvs_;             // shard 1, file order
  std::map<std::string, size_t, std::less<>> kv_index_;  // key -> index in kvs_
  std::vector<TensorView> tensors_;
  std::map<std::string, size_t, std::less<>> tensor_index_;  // name -> index in tensors_
};

}  // namespace gemma3
