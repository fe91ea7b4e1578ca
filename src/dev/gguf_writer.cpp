#include "dev/gguf_writer.h"

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <memory>

namespace gemma3 {
namespace {

template <class T>
void append_le(std::vector<uint8_t>* out, T v) {
  // Hosts are little-endian (x86-64, aarch64), as is GGUF. (resize + memcpy rather than
  // insert: GCC 12 warns falsely about the latter.)
  size_t n = out->size();
  out->resize(n + sizeof(T));
  std::memcpy(out->data() + n, &v, sizeof(T));
}

void append_string(std::vector<uint8_t>* out, std::string_view s) {
  append_le<uint64_t>(out, s.size());
  size_t n = out->size();
  out->resize(n + s.size());
  if (!s.empty()) std::memcpy(out->data() + n, s.data(), s.size());
}

template <class T>
std::vector<uint8_t> scalar_payload(T v) {
  std::vector<uint8_t> p;
  append_le(&p, v);
  return p;
}

template <class T>
std::vector<uint8_t> array_payload(GgufType elem, const std::vector<T>& v) {
  std::vector<uint8_t> p;
  append_le<uint32_t>(&p, static_cast<uint32_t>(elem));
  append_le<uint64_t>(&p, v.size());
  for (const T& x : v) append_le(&p, x);
  return p;
}

uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

struct FileCloser {
  void operator()(std::FILE* f) const {
    if (f) std::fclose(f);
  }
};

}  // namespace

Status GgufSink::write(const void* data, size_t n) {
  if (n && std::fwrite(data, 1, n, f_) != n) {
    return invalid_argument(fmt::format("{}: write failed: {}", *path_, std::strerror(errno)));
  }
  written_ += n;
  return ok_status();
}

void GgufWriter::set_alignment(uint32_t alignment) {
  alignment_ = alignment;
  set_u32("general.alignment", alignment);
  // Re-pack any tensors declared before the alignment changed.
  uint64_t next = 0;
  for (TensorInfo& t : tensors_) {
    t.offset = next;
    next = align_up(next + t.nbytes, alignment_ ? alignment_ : 1);
  }
}

void GgufWriter::set_raw(std::string_view key, uint32_t type_tag, std::vector<uint8_t> payload) {
  for (Kv& kv : kvs_) {
    if (kv.key == key) {
      kv.tag = type_tag;
      kv.payload = std::move(payload);
      return;
    }
  }
  add_raw_kv(key, type_tag, std::move(payload));
}

void GgufWriter::add_raw_kv(std::string_view key, uint32_t type_tag, std::vector<uint8_t> payload) {
  kvs_.push_back(Kv{std::string(key), type_tag, std::move(payload)});
}

bool GgufWriter::remove_key(std::string_view key) {
  for (auto it = kvs_.begin(); it != kvs_.end(); ++it) {
    if (it->key == key) {
      kvs_.erase(it);
      return true;
    }
  }
  return false;
}

#define GEMMA3_GGUF_SETTER(fn, T, tag)                           \
  void GgufWriter::fn(std::string_view key, T v) {               \
    set_raw(key, static_cast<uint32_t>(tag), scalar_payload(v)); \
  }
GEMMA3_GGUF_SETTER(set_u8, uint8_t, GgufType::kUint8)
GEMMA3_GGUF_SETTER(set_i8, int8_t, GgufType::kInt8)
GEMMA3_GGUF_SETTER(set_u16, uint16_t, GgufType::kUint16)
GEMMA3_GGUF_SETTER(set_i16, int16_t, GgufType::kInt16)
GEMMA3_GGUF_SETTER(set_u32, uint32_t, GgufType::kUint32)
GEMMA3_GGUF_SETTER(set_i32, int32_t, GgufType::kInt32)
GEMMA3_GGUF_SETTER(set_u64, uint64_t, GgufType::kUint64)
GEMMA3_GGUF_SETTER(set_i64, int64_t, GgufType::kInt64)
GEMMA3_GGUF_SETTER(set_f32, float, GgufType::kFloat32)
GEMMA3_GGUF_SETTER(set_f64, double, GgufType::kFloat64)
#undef GEMMA3_GGUF_SETTER

void GgufWriter::set_bool(std::string_view key, bool v) {
  set_raw(key, static_cast<uint32_t>(GgufType::kBool), {static_cast<uint8_t>(v ? 1 : 0)});
}

void GgufWriter::set_string(std::string_view key, std::string_view v) {
  std::vector<uint8_t> p;
  append_string(&p, v);
  set_raw(key, static_cast<uint32_t>(GgufType::kString), std::move(p));
}

void GgufWriter::set_string_array(std::string_view key, const std::vector<std::string>& v) {
  std::vector<uint8_t> p;
  append_le<uint32_t>(&p, static_cast<uint32_t>(GgufType::kString));
  append_le<uint64_t>(&p, v.size());
  for (const std::string& s : v) append_string(&p, s);
  set_raw(key, static_cast<uint32_t>(GgufType::kArray), std::move(p));
}

void GgufWriter::set_f32_array(std::string_view key, const std::vector<float>& v) {
  set_raw(key, static_cast<uint32_t>(GgufType::kArray), array_payload(GgufType::kFloat32, v));
}

void GgufWriter::set_i32_array(std::string_view key, const std::vector<int32_t>& v) {
  set_raw(key, static_cast<uint32_t>(GgufType::kArray), array_payload(GgufType::kInt32, v));
}

void GgufWriter::set_u32_array(std::string_view key, const std::vector<uint32_t>& v) {
  set_raw(key, static_cast<uint32_t>(GgufType::kArray), array_payload(GgufType::kUint32, v));
}

void GgufWriter::set_bool_array(std::string_view key, const std::vector<bool>& v) {
  std::vector<uint8_t> bytes(v.begin(), v.end());
  set_raw(key, static_cast<uint32_t>(GgufType::kArray), array_payload(GgufType::kBool, bytes));
}

Status GgufWriter::add_tensor(std::string_view name, DType dtype, const std::vector<int64_t>& shape) {
  if (shape.empty() || shape.size() > 4) {
    return invalid_argument(fmt::format("tensor '{}': {} dims, expected 1..4", name, shape.size()));
  }
  for (int64_t d : shape) {
    if (d < 0)
      return invalid_argument(
          fmt::format("tensor '{}': negative dimension in {}", name, shape_to_string(shape)));
  }
  uint32_t ggml_type = dtype_to_ggml(dtype);
  if (ggml_type == UINT32_MAX) {
    return unsupported(fmt::format("tensor '{}': {} has no GGUF type id", name, dtype_name(dtype)));
  }
  std::optional<uint64_t> rb = row_bytes(dtype, shape.back());
  if (!rb) {
    return invalid_argument(
        fmt::format("tensor '{}': last dimension {} is not a multiple of the {} block size {}", name,
                    shape.back(), dtype_name(dtype), dtype_info(dtype).block_elems));
  }
  TensorInfo t;
  t.name = std::string(name);
  t.dtype = dtype;
  t.shape = shape;
  t.ggml_type = ggml_type;
  t.ne.assign(shape.rbegin(), shape.rend());
  t.nbytes = *rb;
  for (size_t i = 0; i + 1 < shape.size(); ++i) t.nbytes *= static_cast<uint64_t>(shape[i]);
  t.offset = tensors_.empty() ? 0 : align_up(tensors_.back().offset + tensors_.back().nbytes, alignment_);
  tensors_.push_back(std::move(t));
  return ok_status();
}

Status GgufWriter::write(const std::string& path, const TensorDataFn& data) const {
  if (alignment_ == 0) return invalid_argument("GGUF alignment must be a power of two, got 0");
  std::vector<uint8_t> header;
  append_le<uint32_t>(&header, kGgufMagic);
  append_le<uint32_t>(&header, version_);
  append_le<uint64_t>(&header, tensors_.size());
  append_le<uint64_t>(&header, kvs_.size());
  for (const Kv& kv : kvs_) {
    append_string(&header, kv.key);
    append_le<uint32_t>(&header, kv.tag);
    header.insert(header.end(), kv.payload.begin(), kv.payload.end());
  }
  for (const TensorInfo& t : tensors_) {
    append_string(&header, t.name);
    append_le<uint32_t>(&header, static_cast<uint32_t>(t.ne.size()));
    for (uint64_t n : t.ne) append_le<uint64_t>(&header, n);
    append_le<uint32_t>(&header, t.ggml_type);
    append_le<uint64_t>(&header, t.offset);
  }
  if (!tensors_.empty()) header.resize(align_up(header.size(), alignment_), 0);

  std::string tmp = path + ".tmp";
  std::unique_ptr<std::FILE, FileCloser> f(std::fopen(tmp.c_str(), "wb"));
  if (!f) return invalid_argument(fmt::format("{}: cannot create: {}", tmp, std::strerror(errno)));
  std::setvbuf(f.get(), nullptr, _IOFBF, 1 << 20);
  GgufSink sink(f.get(), &tmp);
  Status st = sink.write(header.data(), header.size());
  static const uint8_t kZeros[256] = {};
  auto pad_to = [&](uint64_t target) -> Status {
    while (sink.bytes_written() < target) {
      GEMMA3_TRY(sink.write(kZeros, std::min<uint64_t>(sizeof(kZeros), target - sink.bytes_written())));
    }
    return ok_status();
  };
  const uint64_t data_start = header.size();
  for (size_t i = 0; i < tensors_.size() && st.ok(); ++i) {
    const TensorInfo& t = tensors_[i];
    st = pad_to(data_start + t.offset);
    if (!st.ok()) break;
    uint64_t before = sink.bytes_written();
    st = data(i, t, sink);
    if (!st.ok()) {
      st = st.with_context(fmt::format("writing tensor '{}' to {}", t.name, path));
      break;
    }
    uint64_t got = sink.bytes_written() - before;
    if (got != t.nbytes) {
      st = internal_error(
          fmt::format("{}: tensor '{}' callback wrote {} bytes, expected {}", path, t.name, got, t.nbytes));
      break;
    }
    st = pad_to(align_up(sink.bytes_written(), alignment_));
  }
  if (st.ok() && std::fflush(f.get()) != 0) {
    st = invalid_argument(fmt::format("{}: write failed: {}", tmp, std::strerror(errno)));
  }
  std::FILE* raw = f.release();
  if (std::fclose(raw) != 0 && st.ok()) {
    st = invalid_argument(fmt::format("{}: close failed: {}", tmp, std::strerror(errno)));
  }
  if (!st.ok()) {
    std::remove(tmp.c_str());
    return st;
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    std::remove(tmp.c_str());
    return invalid_argument(fmt::format("cannot rename {} to {}: {}", tmp, path, std::strerror(err)));
  }
  return ok_status();
}

Status GgufWriter::write(const std::string& path, const std::vector<std::vector<uint8_t>>& data) const {
  if (data.size() != tensors_.size()) {
    return invalid_argument(
        fmt::format("{}: {} tensor buffers for {} declared tensors", path, data.size(), tensors_.size()));
  }
  return write(path, [&](size_t i, const TensorInfo&, GgufSink& sink) {
    return sink.write(data[i].data(), data[i].size());
  });
}

}  // namespace gemma3
