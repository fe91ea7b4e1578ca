#include "checkpoint/gguf.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <utility>

namespace gemma3 {
namespace {

// Keys and tensor names longer than this are treated as corruption (ggml caps tensor names at
// 64 bytes; real keys are < 100 bytes). String *values* are only bounded by the file size.
constexpr uint64_t kMaxNameBytes = 1 << 20;
constexpr int kMaxDims = 4;

uint16_t le16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
uint32_t le32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
         (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24);
}
uint64_t le64(const uint8_t* p) {
  return static_cast<uint64_t>(le32(p)) | (static_cast<uint64_t>(le32(p + 4)) << 32);
}

bool is_valid_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    uint8_t c = static_cast<uint8_t>(s[i]);
    int extra;
    uint32_t cp;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      extra = 1;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      extra = 2;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      extra = 3;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (s.size() - i <= static_cast<size_t>(extra)) return false;
    for (int k = 1; k <= extra; ++k) {
      uint8_t cc = static_cast<uint8_t>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    static constexpr uint32_t kMinForLength[4] = {0, 0x80, 0x800, 0x10000};
    if (cp < kMinForLength[extra] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += 1 + extra;
  }
  return true;
}

// Printable form of a name for error messages (names may be garbage in corrupt files).
std::string quoted(std::string_view s, size_t max_len = 64) {
  std::string out = "'";
  for (size_t i = 0; i < s.size() && i < max_len; ++i) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    if (c == '\\' || c == '\'') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20 || c >= 0x7F) {
      out += fmt::format("\\x{:02x}", c);
    } else {
      out += static_cast<char>(c);
    }
  }
  if (s.size() > max_len) out += "...";
  return out + "'";
}

bool is_integer_type(GgufType t) {
  switch (t) {
    case GgufType::kUint8:
    case GgufType::kInt8:
    case GgufType::kUint16:
    case GgufType::kInt16:
    case GgufType::kUint32:
    case GgufType::kInt32:
    case GgufType::kUint64:
    case GgufType::kInt64: return true;
    default: return false;
  }
}
bool is_float_type(GgufType t) { return t == GgufType::kFloat32 || t == GgufType::kFloat64; }

// Integer at p of integer type t. False if it does not fit int64 (UINT64 >= 2^63).
bool decode_int(GgufType t, const uint8_t* p, int64_t* out) {
  switch (t) {
    case GgufType::kUint8: *out = p[0]; return true;
    case GgufType::kInt8: *out = static_cast<int8_t>(p[0]); return true;
    case GgufType::kUint16: *out = le16(p); return true;
    case GgufType::kInt16: *out = static_cast<int16_t>(le16(p)); return true;
    case GgufType::kUint32: *out = le32(p); return true;
    case GgufType::kInt32: *out = static_cast<int32_t>(le32(p)); return true;
    case GgufType::kInt64: *out = static_cast<int64_t>(le64(p)); return true;
    case GgufType::kUint64: {
      uint64_t v = le64(p);
      if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return false;
      *out = static_cast<int64_t>(v);
      return true;
    }
    case GgufType::kBool: *out = p[0]; return true;
    default: return false;
  }
}

double decode_float(GgufType t, const uint8_t* p) {
  if (t == GgufType::kFloat32) {
    uint32_t u = le32(p);
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  uint64_t u = le64(p);
  double d;
  std::memcpy(&d, &u, 8);
  return d;
}

// Bounds-checked little-endian reader over one mapped file. Every read first checks that the
// bytes exist; messages say what was being read, where, and how much was left.
class Cursor {
 public:
  Cursor(const uint8_t* data, uint64_t size) : data_(data), size_(size) {}

  uint64_t pos() const { return pos_; }
  uint64_t remaining() const { return size_ - pos_; }
  const uint8_t* here() const { return data_ + pos_; }

  Status need(uint64_t n, std::string_view what) const {
    if (n > remaining()) {
      return invalid_file(fmt::format("truncated: {} needs {} bytes at offset {}, but only {} remain", what,
                                      n, pos_, remaining()));
    }
    return ok_status();
  }
  Status skip(uint64_t n, std::string_view what) {
    GEMMA3_TRY(need(n, what));
    pos_ += n;
    return ok_status();
  }
  Status u32(uint32_t* v, std::string_view what) {
    GEMMA3_TRY(need(4, what));
    *v = le32(here());
    pos_ += 4;
    return ok_status();
  }
  Status u64(uint64_t* v, std::string_view what) {
    GEMMA3_TRY(need(8, what));
    *v = le64(here());
    pos_ += 8;
    return ok_status();
  }
  // gguf string: u64 length + bytes. Lengths above max_len are rejected as corrupt.
  Status str(std::string_view* s, uint64_t max_len, std::string_view what) {
    uint64_t len;
    GEMMA3_TRY(u64(&len, what));
    if (len > max_len) {
      return invalid_file(
          fmt::format("{} has absurd length {} (limit {}) at offset {}", what, len, max_len, pos_ - 8));
    }
    if (len > remaining()) {
      return invalid_file(
          fmt::format("truncated: {} of length {} at offset {} runs past the end of the file "
                      "({} bytes remain)",
                      what, len, pos_ - 8, remaining()));
    }
    *s = std::string_view(reinterpret_cast<const char*>(here()), static_cast<size_t>(len));
    pos_ += len;
    return ok_status();
  }

 private:
  const uint8_t* data_;
  uint64_t size_;
  uint64_t pos_ = 0;
};

// One value of type `tag` at the cursor (§2.2). Arrays are validated element by element for
// strings and bools; fixed-size arrays are checked against the bytes that remain.
template <class Value>
Status parse_value(Cursor& c, uint32_t tag, Value* v) {
  if (tag > static_cast<uint32_t>(GgufType::kFloat64)) {
    return invalid_file(fmt::format("unknown value type tag {}", tag));
  }
  v->type = static_cast<GgufType>(tag);
  v->payload = c.here();
  uint64_t start = c.pos();
  if (v->type == GgufType::kString) {
    std::string_view s;
    GEMMA3_TRY(c.str(&s, std::numeric_limits<uint64_t>::max(), "string value"));
  } else if (v->type == GgufType::kArray) {
    uint32_t elem_tag;
    uint64_t count;
    GEMMA3_TRY(c.u32(&elem_tag, "array element type"));
    GEMMA3_TRY(c.u64(&count, "array length"));
    if (elem_tag == static_cast<uint32_t>(GgufType::kArray)) {
      return unsupported("nested arrays are not supported");
    }
    if (elem_tag > static_cast<uint32_t>(GgufType::kFloat64)) {
      return invalid_file(fmt::format("unknown array element type tag {}", elem_tag));
    }
    v->elem_type = static_cast<GgufType>(elem_tag);
    v->count = count;
    v->payload = c.here();
    start = c.pos();
    if (v->elem_type == GgufType::kString) {
      // Each string takes at least its 8-byte length field.
      if (count > c.remaining() / 8) {
        return invalid_file(
            fmt::format("array of {} strings at offset {} cannot fit in the {} bytes that "
                        "remain (truncated or corrupt file)",
                        count, c.pos(), c.remaining()));
      }
      std::string_view s;
      for (uint64_t i = 0; i < count; ++i) {
        Status st = c.str(&s, std::numeric_limits<uint64_t>::max(), "array string");
        if (!st.ok()) return st.with_context(fmt::format("element {} of {}", i, count));
      }
    } else {
      uint64_t size = gguf_scalar_size(elem_tag);
      if (count > c.remaining() / size) {
        return invalid_file(
            fmt::format("array of {} {} elements at offset {} needs {} bytes per element, but "
                        "only {} bytes remain (truncated or corrupt file)",
                        count, gguf_type_name(elem_tag), c.pos(), size, c.remaining()));
      }
      if (v->elem_type == GgufType::kBool) {
        for (uint64_t i = 0; i < count; ++i) {
          if (c.here()[i] > 1) {
            return invalid_file(
                fmt::format("BOOL array element {} has value {} (must be 0 or 1)", i, c.here()[i]));
          }
        }
      }
      GEMMA3_TRY(c.skip(count * size, "array data"));
    }
  } else {
    uint64_t size = gguf_scalar_size(tag);
    GEMMA3_TRY(c.need(size, gguf_type_name(tag) + " value"));
    if (v->type == GgufType::kBool && c.here()[0] > 1) {
      return invalid_file(fmt::format("BOOL value is {} (must be 0 or 1)", c.here()[0]));
    }
    GEMMA3_TRY(c.skip(size, "value"));
  }
  v->payload_bytes = c.pos() - start;
  return ok_status();
}

const char* ggml_type_name_any(uint32_t id) {
  // Ids we know of but do not load (docs/formats.md §2.4), for the error message.
  switch (id) {
    case 9: return "Q8_1";
    case 15: return "Q8_K";
    case 16: return "IQ2_XXS";
    case 17: return "IQ2_XS";
    case 18: return "IQ3_XXS";
    case 19: return "IQ1_S";
    case 21: return "IQ3_S";
    case 22: return "IQ2_S";
    case 24: return "I8";
    case 25: return "I16";
    case 26: return "I32";
    case 27: return "I64";
    case 28: return "F64";
    case 29: return "IQ1_M";
    case 34: return "TQ1_0";
    case 35: return "TQ2_0";
    case 39: return "MXFP4";
    default: return nullptr;
  }
}

// "<prefix>-00001-of-00003.gguf" -> (prefix, 1, 3).
bool parse_split_name(const std::string& path, std::string* prefix, int* index, int* count) {
  static constexpr std::string_view kTail = "-00000-of-00000.gguf";
  if (path.size() <= kTail.size()) return false;
  std::string_view tail = std::string_view(path).substr(path.size() - kTail.size());
  for (size_t i = 0; i < kTail.size(); ++i) {
    bool digit = tail[i] >= '0' && tail[i] <= '9';
    if ((kTail[i] == '0') != digit) return false;
    if (!digit && tail[i] != kTail[i]) return false;
  }
  *index = std::stoi(std::string(tail.substr(1, 5)));
  *count = std::stoi(std::string(tail.substr(10, 5)));
  *prefix = path.substr(0, path.size() - kTail.size());
  return *index >= 1 && *count >= 1 && *index <= *count;
}

std::string escape_for_display(std::string_view s) {
  std::string out;
  for (char ch : s) {
    unsigned char c = static_cast<unsigned char>(ch);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += ch;
    } else if (c == '\n') {
      out += "\\n";
    } else if (c < 0x20 || c == 0x7F) {
      out += fmt::format("\\x{:02x}", c);
    } else {
      out += ch;
    }
  }
  return out;
}

}  // namespace

std::string gguf_type_name(uint32_t tag) {
  static constexpr const char* kNames[] = {"UINT8",  "INT8",    "UINT16", "INT16",  "UINT32",
                                           "INT32",  "FLOAT32", "BOOL",   "STRING", "ARRAY",
                                           "UINT64", "INT64",   "FLOAT64"};
  if (tag < std::size(kNames)) return kNames[tag];
  return fmt::format("type {}", tag);
}

uint64_t gguf_scalar_size(uint32_t tag) {
  switch (static_cast<GgufType>(tag)) {
    case GgufType::kUint8:
    case GgufType::kInt8:
    case GgufType::kBool: return 1;
    case GgufType::kUint16:
    case GgufType::kInt16: return 2;
    case GgufType::kUint32:
    case GgufType::kInt32:
    case GgufType::kFloat32: return 4;
    case GgufType::kUint64:
    case GgufType::kInt64:
    case GgufType::kFloat64: return 8;
    default: return 0;
  }
}

struct GgufFile::Shard {
  uint32_t version = 0;
  uint32_t alignment = kGgufDefaultAlignment;
  std::vector<Kv> kvs;
  std::map<std::string, size_t, std::less<>> kv_index;
  std::vector<TensorView> tensors;

  const Value* find(std::string_view key) const {
    auto it = kv_index.find(key);
    return it == kv_index.end() ? nullptr : &kvs[it->second].value;
  }
};

Status GgufFile::parse_shard(const MappedFile& file, Shard* out) {
  Cursor c(file.data(), file.size());

  // ---- header: magic, version, counts (§2.1) ----
  if (file.size() < 4)
    return invalid_file(fmt::format("truncated: {} bytes, too short for the GGUF magic", file.size()));
  uint32_t magic = le32(file.data());
  if (magic != kGgufMagic) {
    return invalid_file(fmt::format("bad magic {} (0x{:08x}), expected 'GGUF'; not a GGUF file",
                                    quoted(std::string_view(reinterpret_cast<const char*>(file.data()), 4)),
                                    magic));
  }
  GEMMA3_TRY(c.skip(4, "magic"));
  uint32_t version;
  GEMMA3_TRY(c.u32(&version, "version"));
  if (version != 0 && (version & 0xFFFF) == 0) {
    return unsupported(
        fmt::format("version reads as 0x{:08x}: a big-endian (byte-swapped) GGUF, which is not "
                    "supported",
                    version));
  }
  if (version == 1) return unsupported("GGUF version 1 is not supported (only versions 2 and 3)");
  if (version != 2 && version != 3) {
    return unsupported(fmt::format("unknown GGUF version {} (only versions 2 and 3 are supported)", version));
  }
  out->version = version;
  uint64_t tensor_count, kv_count;
  GEMMA3_TRY(c.u64(&tensor_count, "tensor count"));
  GEMMA3_TRY(c.u64(&kv_count, "key-value count"));
  // Minimum encoded sizes: a kv is key length (8) + tag (4) + at least 1 value byte; a tensor
  // info is name length (8) + n_dims (4) + one ne (8) + type (4) + offset (8).
  constexpr uint64_t kMinKvBytes = 13, kMinTensorBytes = 32;
  if (kv_count > c.remaining() / kMinKvBytes) {
    return invalid_file(fmt::format("too many key-value pairs: header says {}, but only {} bytes follow",
                                    kv_count, c.remaining()));
  }
  if (tensor_count > c.remaining() / kMinTensorBytes ||
      kv_count * kMinKvBytes + tensor_count * kMinTensorBytes > c.remaining()) {
    return invalid_file(
        fmt::format("too many tensors: header says {} tensors and {} key-value pairs, but only {} "
                    "bytes follow",
                    tensor_count, kv_count, c.remaining()));
  }

  // ---- metadata (§2.2) ----
  out->kvs.reserve(kv_count);
  for (uint64_t i = 0; i < kv_count; ++i) {
    std::string_view key;
    Status st = c.str(&key, kMaxNameBytes, "key");
    if (!st.ok()) return st.with_context(fmt::format("key-value pair {}", i));
    if (key.empty()) return invalid_file(fmt::format("key-value pair {} has an empty key", i));
    if (!is_valid_utf8(key))
      return invalid_file(fmt::format("key {} (pair {}) is not valid UTF-8", quoted(key), i));
    if (out->kv_index.count(key)) return invalid_file(fmt::format("duplicate key {}", quoted(key)));
    uint32_t tag;
    Value v;
    st = c.u32(&tag, "value type");
    if (st.ok()) st = parse_value(c, tag, &v);
    if (!st.ok()) return st.with_context(fmt::format("key {}", quoted(key)));
    out->kv_index.emplace(std::string(key), out->kvs.size());
    out->kvs.push_back(Kv{std::string(key), v});
  }

  if (const Value* a = out->find("general.alignment")) {
    if (a->type != GgufType::kUint32) {
      return invalid_file(fmt::format("key 'general.alignment' has type {}, expected UINT32",
                                      gguf_type_name(static_cast<uint32_t>(a->type))));
    }
    uint32_t align = le32(a->payload);
    if (align == 0 || (align & (align - 1)) != 0) {
      return invalid_file(fmt::format("key 'general.alignment' = {} is not a power of two", align));
    }
    out->alignment = align;
  }
  const uint64_t align = out->alignment;

  // ---- tensor infos ----
  struct Placement {
    uint64_t offset;
    uint64_t nbytes;
  };
  std::vector<Placement> placement;
  placement.reserve(tensor_count);
  out->tensors.reserve(tensor_count);
  std::map<std::string_view, size_t, std::less<>> names;
  for (uint64_t i = 0; i < tensor_count; ++i) {
    std::string_view name;
    Status st = c.str(&name, kMaxNameBytes, "tensor name");
    if (!st.ok()) return st.with_context(fmt::format("tensor info {}", i));
    if (name.empty()) return invalid_file(fmt::format("tensor info {} has an empty name", i));
    if (!is_valid_utf8(name)) {
      return invalid_file(fmt::format("tensor name {} (tensor info {}) is not valid UTF-8", quoted(name), i));
    }
    std::string ctx = fmt::format("tensor {}", quoted(name));
    if (names.count(name)) return invalid_file(fmt::format("duplicate tensor name {}", quoted(name)));
    names.emplace(name, i);

    uint32_t n_dims;
    st = c.u32(&n_dims, "n_dims");
    if (!st.ok()) return st.with_context(ctx);
    if (n_dims == 0 || n_dims > kMaxDims) {
      return invalid_file(fmt::format("{}: n_dims = {}, expected 1..{}", ctx, n_dims, kMaxDims));
    }
    std::vector<int64_t> ne(n_dims);
    int64_t numel = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      uint64_t v;
      st = c.u64(&v, "ne");
      if (!st.ok()) return st.with_context(ctx);
      if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return invalid_file(
            fmt::format("{}: ne[{}] = {} is negative as int64", ctx, d, static_cast<int64_t>(v)));
      }
      ne[d] = static_cast<int64_t>(v);
      if (ne[d] != 0 && numel > std::numeric_limits<int64_t>::max() / ne[d]) {
        return invalid_file(fmt::format("{}: element count overflows int64 (ne[{}] = {})", ctx, d, ne[d]));
      }
      numel *= ne[d];
    }
    uint32_t type_id;
    st = c.u32(&type_id, "tensor type");
    if (!st.ok()) return st.with_context(ctx);
    std::optional<DType> dtype = dtype_from_ggml(type_id);
    if (!dtype) {
      const char* known = ggml_type_name_any(type_id);
      return unsupported(fmt::format("{} has ggml type {} ({}), which is not supported", ctx, type_id,
                                     known ? known : "unknown type id"));
    }
    const DTypeInfo& info = dtype_info(*dtype);
    std::optional<uint64_t> rb = row_bytes(*dtype, ne[0]);
    if (!rb) {
      return invalid_file(fmt::format("{}: ne[0] = {} is not a multiple of the {} block size {}", ctx, ne[0],
                                      info.name, info.block_elems));
    }
    uint64_t nbytes = *rb;
    for (uint32_t d = 1; d < n_dims; ++d) {
      uint64_t n = static_cast<uint64_t>(ne[d]);
      if (n != 0 && nbytes > std::numeric_limits<uint64_t>::max() / n) {
        return invalid_file(fmt::format("{}: byte size overflows", ctx));
      }
      nbytes *= n;
    }
    uint64_t offset;
    st = c.u64(&offset, "tensor offset");
    if (!st.ok()) return st.with_context(ctx);
    if (offset % align != 0) {
      return invalid_file(
          fmt::format("{}: offset {} is not a multiple of the alignment {}", ctx, offset, align));
    }
    TensorView t;
    t.name = std::string(name);
    t.dtype = *dtype;
    t.shape.assign(ne.rbegin(), ne.rend());  // GGUF ne[0] is fastest; HF order is slowest first
    t.nbytes = nbytes;
    out->tensors.push_back(std::move(t));
    placement.push_back({offset, nbytes});
  }

  // ---- data section ----
  if (tensor_count == 0) return ok_status();
  uint64_t data_start = c.pos() + (align - c.pos() % align) % align;
  uint64_t data_avail = data_start <= file.size() ? file.size() - data_start : 0;
  for (size_t i = 0; i < out->tensors.size(); ++i) {
    const Placement& p = placement[i];
    if (p.offset > data_avail || p.nbytes > data_avail - p.offset) {
      return invalid_file(
          fmt::format("tensor {}: data [{}, +{}) relative to the data section at {} runs past the end "
                      "of the file ({} bytes); truncated?",
                      quoted(out->tensors[i].name), p.offset, p.nbytes, data_start, file.size()));
    }
    // Empty tensors get no pointer (their offset may sit exactly at, or past, the end).
    out->tensors[i].data = p.nbytes ? file.data() + data_start + p.offset : nullptr;
  }
  std::vector<size_t> order(out->tensors.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(),
            [&](size_t a, size_t b) { return placement[a].offset < placement[b].offset; });
  size_t prev = SIZE_MAX;
  for (size_t i : order) {
    if (placement[i].nbytes == 0) continue;  // empty tensors occupy no bytes
    if (prev != SIZE_MAX && placement[prev].offset + placement[prev].nbytes > placement[i].offset) {
      return invalid_file(fmt::format(
          "tensors {} (offset {}, {} bytes) and {} (offset {}) overlap", quoted(out->tensors[prev].name),
          placement[prev].offset, placement[prev].nbytes, quoted(out->tensors[i].name), placement[i].offset));
    }
    prev = i;
  }
  return ok_status();
}

Result<GgufFile> GgufFile::open(const std::string& path) {
  std::string prefix;
  int index = 0, count = 0;
  if (!parse_split_name(path, &prefix, &index, &count)) {
    GEMMA3_ASSIGN_OR_RETURN(MappedFile file, MappedFile::open(path));
    return open_single(std::move(file));
  }

  // Split GGUF (§2.5): every shard is a complete GGUF; metadata lives in shard 1.
  GgufFile out;
  int64_t declared_total = -1;
  for (int k = 1; k <= count; ++k) {
    std::string shard_path = fmt::format("{}-{:05d}-of-{:05d}.gguf", prefix, k, count);
    Result<MappedFile> file = MappedFile::open(shard_path);
    if (!file.ok()) {
      return file.status().with_context(fmt::format("opening shard {} of {} of {}", k, count, path));
    }
    Shard shard;
    Status st = parse_shard(*file, &shard);
    if (!st.ok()) return st.with_context(shard_path);

    // split.count / split.no: any integer type (llama-gguf-split writes UINT16).
    auto shard_int = [&](std::string_view key, int64_t* v) -> Status {
      const Value* val = shard.find(key);
      if (!val)
        return not_found(fmt::format("{}: key '{}' is missing in a split GGUF shard", shard_path, key));
      if (!is_integer_type(val->type) || !decode_int(val->type, val->payload, v)) {
        return invalid_file(fmt::format("{}: key '{}' has type {}, expected an integer", shard_path, key,
                                        gguf_type_name(static_cast<uint32_t>(val->type))));
      }
      return ok_status();
    };
    int64_t split_count = 0, split_no = 0;
    if (count > 1 || shard.find("split.count")) {
      Status s1 = shard_int("split.count", &split_count);
      if (!s1.ok()) return invalid_file(s1.message());
      if (split_count != count) {
        return invalid_file(fmt::format("{}: split.count = {}, but the file name says {} shards", shard_path,
                                        split_count, count));
      }
      if (shard.find("split.no")) {
        Status s2 = shard_int("split.no", &split_no);
        if (!s2.ok()) return s2;
        if (split_no != k - 1) {
          return invalid_file(fmt::format("{}: split.no = {}, expected {} (0-based) for shard {} of {}",
                                          shard_path, split_no, k - 1, k, count));
        }
      }
    }
    if (k == 1) {
      if (shard.find("split.tensors.count")) {
        Status s3 = shard_int("split.tensors.count", &declared_total);
        if (!s3.ok()) return s3;
      } else if (count > 1) {
        return invalid_file(
            fmt::format("{}: key 'split.tensors.count' is missing in shard 1 of a split GGUF", shard_path));
      }
      out.path_ = shard_path;
      out.version_ = shard.version;
      out.alignment_ = shard.alignment;
      out.kvs_ = std::move(shard.kvs);
      out.kv_index_ = std::move(shard.kv_index);
    }
    for (TensorView& t : shard.tensors) {
      if (out.tensor_index_.count(t.name)) {
        return invalid_file(fmt::format("{}: duplicate tensor name {} (also in an earlier shard)", shard_path,
                                        quoted(t.name)));
      }
      out.tensor_index_.emplace(t.name, out.tensors_.size());
      out.tensors_.push_back(std::move(t));
    }
    out.shards_.push_back(std::move(*file));
  }
  if (declared_total >= 0 && static_cast<uint64_t>(declared_total) != out.tensors_.size()) {
    return invalid_file(fmt::format("{}: split.tensors.count = {}, but the {} shards hold {} tensors",
                                    out.path_, declared_total, count, out.tensors_.size()));
  }
  return out;
}

Result<GgufFile> GgufFile::open_single(MappedFile file) {
  Shard shard;
  Status st = parse_shard(file, &shard);
  if (!st.ok()) return st.with_context(file.path());
  GgufFile out;
  out.path_ = file.path();
  out.version_ = shard.version;
  out.alignment_ = shard.alignment;
  out.kvs_ = std::move(shard.kvs);
  out.kv_index_ = std::move(shard.kv_index);
  out.tensors_ = std::move(shard.tensors);
  for (size_t i = 0; i < out.tensors_.size(); ++i) out.tensor_index_.emplace(out.tensors_[i].name, i);
  out.shards_.push_back(std::move(file));  // the mapping's address does not change on move
  return out;
}

// ---- metadata access ------------------------------------------------------------------------

const GgufFile::Value* GgufFile::find_value(std::string_view key) const {
  auto it = kv_index_.find(key);
  return it == kv_index_.end() ? nullptr : &kvs_[it->second].value;
}

Status GgufFile::missing(std::string_view key) const {
  return not_found(fmt::format("key '{}' not found in {}", key, path_));
}

Status GgufFile::type_error(std::string_view key, const Value& v, std::string_view expected) const {
  std::string type = gguf_type_name(static_cast<uint32_t>(v.type));
  if (v.type == GgufType::kArray) type += "[" + gguf_type_name(static_cast<uint32_t>(v.elem_type)) + "]";
  return invalid_file(fmt::format("{}: key '{}' has type {}, expected {}", path_, key, type, expected));
}

bool GgufFile::has(std::string_view key) const { return find_value(key) != nullptr; }

Result<GgufType> GgufFile::type_of(std::string_view key) const {
  const Value* v = find_value(key);
  if (!v) return missing(key);
  return v->type;
}

Result<std::string> GgufFile::get_string(std::string_view key) const {
  const Value* v = find_value(key);
  if (!v) return missing(key);
  if (v->type != GgufType::kString) return type_error(key, *v, "STRING");
  return std::string(reinterpret_cast<const char*>(v->payload + 8), v->payload_bytes - 8);
}

Result<int64_t> GgufFile::get_int(std::string_view key) const {
  const Value* v = find_value(key);
  if (!v) return missing(key);
  if (!is_integer_type(v->type)) return type_error(key, *v, "an integer");
  int64_t out;
  if (!decode_int(v->type, v->payload, &out)) {
    return out_of_range(fmt::format("{}: key '{}' = {} does not fit in int64", path_, key, le64(v->payload)));
  }
  return out;
}

Result<double> GgufFile::get_float(std::string_view key) const {
  const Value* v = find_value(key);
  if (!v) return missing(key);
  if (is_float_type(v->type)) return decode_float(v->type, v->payload);
  if (v->type == GgufType::kUint64) return static_cast<double>(le64(v->payload));
  int64_t i;
  if (is_integer_type(v->type) && decode_int(v->type, v->payload, &i)) return static_cast<double>(i);
  return type_error(key, *v, "a number");
}

Result<bool> GgufFile::get_bool(std::string_view key) const {
  const Value* v = find_value(key);
  if (!v) return missing(key);
  if (v->type != GgufType::kBool) return type_error(key, *v, "BOOL");
  return v->payload[0] != 0;
}

Result<uint64_t> GgufFile::array_size(std::string_view key) const {
  const Value* v = find_value(key);
  if (!v) return missing(key);
  if (v->type != GgufType::kArray) return type_error(key, *v, "an array");
  return v->count;
}

Result<std::vector<std::string>> GgufFile::get_string_array(std::string_view key) const {
  const Value* v = find_value(key);
  if (!v) return missing(key);
  if (v->type != GgufType::kArray || v->elem_type != GgufType::kString)
    return type_error(key, *v, "ARRAY[STRING]");
  std::vector<std::string> out;
  out.reserve(v->count);
  const uint8_t* p = v->payload;  // validated at open: every length fits
  for (uint64_t i = 0; i < v->count; ++i) {
    uint64_t len = le64(p);
    out.emplace_back(reinterpret_cast<const char*>(p + 8), len);
    p += 8 + len;
  }
  return out;
}

Result<std::vector<float>> GgufFile::get_float_array(std::string_view key) const {
  const Value* v = find_value(key);
  if (!v) return missing(key);
  if (v->type != GgufType::kArray || !(is_float_type(v->elem_type) || is_integer_type(v->elem_type))) {
    return type_error(key, *v, "an array of numbers");
  }
  uint64_t size = gguf_scalar_size(static_cast<uint32_t>(v->elem_type));
  std::vector<float> out(v->count);
  for (uint64_t i = 0; i < v->count; ++i) {
    const uint8_t* p = v->payload + i * size;
    if (is_float_type(v->elem_type)) {
      out[i] = static_cast<float>(decode_float(v->elem_type, p));
    } else if (v->elem_type == GgufType::kUint64) {
      out[i] = static_cast<float>(le64(p));
    } else {
      int64_t x = 0;
      decode_int(v->elem_type, p, &x);
      out[i] = static_cast<float>(x);
    }
  }
  return out;
}

Result<std::vector<int64_t>> GgufFile::get_int_array(std::string_view key) const {
  const Value* v = find_value(key);
  if (!v) return missing(key);
  if (v->type != GgufType::kArray || !(is_integer_type(v->elem_type) || v->elem_type == GgufType::kBool)) {
    return type_error(key, *v, "an array of integers");
  }
  uint64_t size = gguf_scalar_size(static_cast<uint32_t>(v->elem_type));
  std::vector<int64_t> out(v->count);
  for (uint64_t i = 0; i < v->count; ++i) {
    if (!decode_int(v->elem_type, v->payload + i * size, &out[i])) {
      return out_of_range(fmt::format("{}: key '{}' element {} does not fit in int64", path_, key, i));
    }
  }
  return out;
}

std::vector<std::string> GgufFile::keys() const {
  std::vector<std::string> out;
  out.reserve(kvs_.size());
  for (const Kv& kv : kvs_) out.push_back(kv.key);
  return out;
}

std::string GgufFile::value_to_string(std::string_view key, size_t max_len) const {
  const Value* v = find_value(key);
  if (!v) return "<missing>";
  auto scalar = [](GgufType t, const uint8_t* p, size_t max) -> std::string {
    switch (t) {
      case GgufType::kFloat32:
      case GgufType::kFloat64: return fmt::format("{}", decode_float(t, p));
      case GgufType::kBool: return p[0] ? "true" : "false";
      case GgufType::kUint64: return fmt::format("{}", le64(p));
      case GgufType::kString: {
        uint64_t len = le64(p);
        std::string_view s(reinterpret_cast<const char*>(p + 8), std::min<uint64_t>(len, max + 1));
        return "\"" + escape_for_display(s) + "\"";
      }
      default: {
        int64_t i = 0;
        decode_int(t, p, &i);
        return fmt::format("{}", i);
      }
    }
  };
  std::string out;
  if (v->type != GgufType::kArray) {
    out = scalar(v->type, v->payload, max_len);
  } else {
    out = "[";
    const uint8_t* p = v->payload;
    uint64_t size = gguf_scalar_size(static_cast<uint32_t>(v->elem_type));
    for (uint64_t i = 0; i < v->count && out.size() <= max_len; ++i) {
      if (i) out += ", ";
      out += scalar(v->elem_type, p, max_len);
      p += v->elem_type == GgufType::kString ? 8 + le64(p) : size;
    }
    out += "]";
  }
  std::string suffix = v->type == GgufType::kArray ? fmt::format(" ({} elements)", v->count) : "";
  if (out.size() > max_len) {
    size_t cut = max_len > 3 ? max_len - 3 : 0;
    // Do not cut a UTF-8 sequence in half.
    while (cut > 0 && (static_cast<unsigned char>(out[cut]) & 0xC0) == 0x80) --cut;
    out = out.substr(0, cut) + "...";
  }
  return out + suffix;
}

const TensorView* GgufFile::find_tensor(std::string_view name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

}  // namespace gemma3
