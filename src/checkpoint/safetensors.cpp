#include "checkpoint/safetensors.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <unordered_set>
#include <utility>

namespace gemma3 {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

static_assert(std::endian::native == std::endian::little, "safetensors data is little-endian");

// The reference reader (huggingface/safetensors, tensor.rs) refuses larger headers.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

struct DTypeEntry {
  const char* name;  // safetensors spelling
  DType dtype;
  int bytes;
};
constexpr DTypeEntry kLoadable[] = {
    {"BF16", DType::kBF16, 2},
    {"F16", DType::kF16, 2},
    {"F32", DType::kF32, 4},
    {"F8_E4M3", DType::kF8E4M3, 1},
};
// Valid safetensors dtypes (docs/formats.md §1.3) that this engine does not load.
constexpr const char* kKnownUnloadable[] = {
    "BOOL", "U8",  "I8",      "U16",     "I16", "U32",         "I32",         "U64",     "I64",
    "F64",  "C64", "F8_E5M2", "F8_E8M0", "F4",  "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F6_E2M3", "F6_E3M2"};

const DTypeEntry* loadable_dtype(std::string_view s) {
  for (const DTypeEntry& e : kLoadable)
    if (s == e.name) return &e;
  return nullptr;
}
const DTypeEntry& loadable_dtype(DType t) {
  for (const DTypeEntry& e : kLoadable)
    if (e.dtype == t) return e;
  return kLoadable[2];  // unreachable: only loadable dtypes are ever stored
}

// One tensor as listed in a header, before the checks that need all of them.
struct Entry {
  TensorView view;
  uint64_t begin = 0, end = 0;  // relative to the data buffer
};

struct ParsedFile {
  MappedFile file;
  std::vector<TensorView> tensors;  // [n] in data-offset order
};

std::string json_type(const json& v) { return v.type_name(); }

Status parse_entry(const std::string& path, const std::string& name, const json& e, Entry* out) {
  auto bad = [&](const std::string& what) {
    return invalid_file(fmt::format("{}: tensor '{}': {}", path, name, what));
  };
  if (!e.is_object())
    return bad(fmt::format("header entry is a JSON {}, expected an object with dtype, shape, data_offsets",
                           json_type(e)));
  auto dt = e.find("dtype");
  if (dt == e.end() || !dt->is_string()) return bad("header entry has no string 'dtype'");
  const std::string dtype_str = dt->get<std::string>();
  const DTypeEntry* d = loadable_dtype(dtype_str);
  if (!d) {
    bool known = std::any_of(std::begin(kKnownUnloadable), std::end(kKnownUnloadable),
                             [&](const char* k) { return dtype_str == k; });
    if (!known)
      return bad(fmt::format("unknown dtype '{}' (safetensors dtypes: BF16, F16, F32, F8_E4M3, I32, ...)",
                             dtype_str));
    std::string hint;
    if (dtype_str == "I32" || dtype_str == "U8" || dtype_str == "I8")
      hint =
          "; integer tensors here usually mean a compressed-tensors int4/int8 checkpoint "
          "(weight_packed), which is not supported: use a GGUF or an FP8/BF16 checkpoint";
    return unsupported(
        fmt::format("{}: tensor '{}' has dtype {}; only BF16, F16, F32 and F8_E4M3 are loaded{}", path, name,
                    dtype_str, hint));
  }

  auto sh = e.find("shape");
  if (sh == e.end() || !sh->is_array()) return bad("header entry has no array 'shape'");
  std::vector<int64_t> shape;
  int64_t numel = 1;
  for (const json& v : *sh) {
    if (!v.is_number_unsigned() || v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
      return bad(fmt::format("shape {} has an entry that is not a non-negative integer", sh->dump()));
    int64_t dim = static_cast<int64_t>(v.get<uint64_t>());
    if (__builtin_mul_overflow(numel, dim, &numel))
      return bad(fmt::format("shape {} has more than 2^63 elements", sh->dump()));
    shape.push_back(dim);
  }
  uint64_t expected_bytes = 0;
  if (__builtin_mul_overflow(static_cast<uint64_t>(numel), static_cast<uint64_t>(d->bytes), &expected_bytes))
    return bad(fmt::format("shape {} of {} is larger than 2^64 bytes", sh->dump(), dtype_str));

  auto off = e.find("data_offsets");
  if (off == e.end() || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
      !(*off)[1].is_number_unsigned())
    return bad("header entry has no 'data_offsets' [begin, end] of non-negative integers");
  out->begin = (*off)[0].get<uint64_t>();
  out->end = (*off)[1].get<uint64_t>();
  if (out->end < out->begin)
    return bad(fmt::format("data_offsets [{}, {}] end before they begin", out->begin, out->end));
  if (out->end - out->begin != expected_bytes)
    return bad(fmt::format("data_offsets [{}, {}] hold {} bytes, but shape {} of {} needs {}", out->begin,
                           out->end, out->end - out->begin, sh->dump(), dtype_str, expected_bytes));
  out->view.name = name;
  out->view.dtype = d->dtype;
  out->view.shape = std::move(shape);
  out->view.nbytes = expected_bytes;
  return ok_status();
}

// Maps one .safetensors file and checks its header the way the reference reader does
// (docs/formats.md §1.2): tensors tile the data buffer exactly, no holes, no overlaps.
Result<ParsedFile> parse_file(const std::string& path) {
  GEMMA3_ASSIGN_OR_RETURN(MappedFile file, MappedFile::open(path));
  const uint64_t size = file.size();
  if (size < 8)
    return invalid_file(
        fmt::format("{}: file is {} bytes, too short for the 8-byte safetensors header length", path, size));
  uint64_t n = 0;
  std::memcpy(&n, file.data(), 8);
  if (n > kMaxHeaderBytes)
    return invalid_file(fmt::format(
        "{}: header length {} exceeds the safetensors limit of {} bytes (not a safetensors file?)", path, n,
        kMaxHeaderBytes));
  if (n > size - 8)
    return invalid_file(fmt::format(
        "{}: header length {} runs past the end of the file ({} bytes): truncated?", path, n, size));

  // Duplicate tensor names are an error in the reference reader; nlohmann keeps the last one
  // silently, so catch them while parsing.
  std::string duplicate;
  std::unordered_set<std::string> seen;
  json::parser_callback_t on_event = [&](int depth, json::parse_event_t event, json& parsed) {
    if (depth == 1 && event == json::parse_event_t::key && parsed.is_string()) {
      if (!seen.insert(parsed.get<std::string>()).second && duplicate.empty())
        duplicate = parsed.get<std::string>();
    }
    return true;
  };
  const char* hdr = reinterpret_cast<const char*>(file.data() + 8);
  json header;
  try {
    header = json::parse(hdr, hdr + n, on_event);
  } catch (const json::exception& e) {
    return invalid_file(
        fmt::format("{}: header ({} bytes at offset 8) is not valid JSON: {}", path, n, e.what()));
  }
  if (!header.is_object())
    return invalid_file(fmt::format("{}: header is a JSON {}, expected an object of tensor entries", path,
                                    json_type(header)));
  if (!duplicate.empty())
    return invalid_file(fmt::format("{}: tensor '{}' is listed twice in the header", path, duplicate));

  const uint64_t data_start = 8 + n;
  const uint64_t data_size = size - data_start;
  std::vector<Entry> entries;
  entries.reserve(header.size());
  for (const auto& [name, e] : header.items()) {
    if (name == "__metadata__") continue;  // free-form string map ({"format": "pt"})
    Entry entry;
    GEMMA3_TRY(parse_entry(path, name, e, &entry));
    if (entry.end > data_size)
      return invalid_file(fmt::format(
          "{}: tensor '{}': data_offsets [{}, {}] run past the end of the data ({} bytes after the header): "
          "truncated file?",
          path, name, entry.begin, entry.end, data_size));
    entries.push_back(std::move(entry));
  }

  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t covered = 0;  // end of the previous tensor
  const std::string* prev_name = nullptr;
  for (const Entry& e : entries) {
    if (e.begin < covered)
      return invalid_file(fmt::format("{}: tensor '{}' (bytes [{}, {})) overlaps tensor '{}' (ends at {})",
                                      path, e.view.name, e.begin, e.end, prev_name ? *prev_name : "",
                                      covered));
    if (e.begin > covered)
      return invalid_file(fmt::format(
          "{}: tensor '{}' starts at data offset {}, leaving a {}-byte hole after {}", path, e.view.name,
          e.begin, e.begin - covered, prev_name ? "tensor '" + *prev_name + "'" : "the header"));
    covered = e.end;
    prev_name = &e.view.name;
  }
  if (covered != data_size)
    return invalid_file(fmt::format(
        "{}: tensors end at data offset {} but the file has {} data bytes ({} bytes left over{})", path,
        covered, data_size, data_size - covered, prev_name ? ", after tensor '" + *prev_name + "'" : ""));

  ParsedFile parsed;
  parsed.tensors.reserve(entries.size());
  for (Entry& e : entries) {
    e.view.data = file.data() + data_start + e.begin;
    parsed.tensors.push_back(std::move(e.view));
  }
  parsed.file = std::move(file);
  return parsed;
}

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

// Scale element i as fp32; `p` may be misaligned.
float read_scale(DType t, const uint8_t* p, int64_t i) {
  switch (t) {
    case DType::kF32: {
      float f;
      std::memcpy(&f, p + 4 * i, 4);
      return f;
    }
    case DType::kBF16: {
      uint16_t h;
      std::memcpy(&h, p + 2 * i, 2);
      return bf16_to_f32(h);
    }
    case DType::kF16: {
      uint16_t h;
      std::memcpy(&h, p + 2 * i, 2);
      return f16_to_f32(h);
    }
    default: return NAN;
  }
}

}  // namespace

const TensorView* SafetensorsSet::find_tensor(std::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

const std::string& SafetensorsSet::file_of(std::string_view name) const {
  static const std::string kNone;
  auto it = index_.find(name);
  return it == index_.end() ? kNone : files_[tensor_file_[it->second]].path();
}

std::vector<std::string> SafetensorsSet::file_paths() const {
  std::vector<std::string> out;
  for (const MappedFile& f : files_) out.push_back(f.path());
  return out;
}

void SafetensorsSet::rebuild_index() {
  index_.clear();
  for (size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
}

namespace {

// Collects the shards, checks names are unique across them. `expected` (from an index's
// weight_map: tensor -> shard file name) is checked against what the headers list.
struct Assembly {
  std::vector<MappedFile> files;
  std::vector<TensorView> tensors;
  std::vector<uint32_t> tensor_file;
};

Status add_file(Assembly& a, ParsedFile parsed, std::unordered_map<std::string, uint32_t>& where) {
  const uint32_t file_index = static_cast<uint32_t>(a.files.size());
  for (TensorView& t : parsed.tensors) {
    auto [it, inserted] = where.emplace(t.name, file_index);
    if (!inserted)
      return invalid_file(fmt::format("tensor '{}' is in both {} and {}", t.name, a.files[it->second].path(),
                                      parsed.file.path()));
    a.tensors.push_back(std::move(t));
    a.tensor_file.push_back(file_index);
  }
  a.files.push_back(std::move(parsed.file));
  return ok_status();
}

// Folds `X.weight_scale` into the F8_E4M3 tensor `X.weight` (see the header comment) and
// drops the scale tensors and `X.input_scale`.
Status attach_fp8_scales(Assembly& a) {
  std::unordered_map<std::string_view, size_t> by_name;
  for (size_t i = 0; i < a.tensors.size(); ++i) by_name.emplace(a.tensors[i].name, i);
  auto file = [&](size_t i) -> const std::string& { return a.files[a.tensor_file[i]].path(); };
  auto lookup = [&](const std::string& name) -> std::optional<size_t> {
    auto it = by_name.find(name);
    if (it == by_name.end()) return std::nullopt;
    return it->second;
  };

  std::vector<bool> drop(a.tensors.size(), false);
  for (size_t i = 0; i < a.tensors.size(); ++i) {
    TensorView& w = a.tensors[i];
    if (w.dtype != DType::kF8E4M3) continue;
    if (lookup(w.name + "_scale_inv"))
      return unsupported(fmt::format(
          "{}: F8_E4M3 tensor '{}' has a '{}_scale_inv' (HF quant_method \"fp8\", block-wise scales); only "
          "compressed-tensors per-tensor or per-channel '_scale' tensors are supported",
          file(i), w.name, w.name));
    if (ends_with(w.name, ".weight")) {
      const std::string module = w.name.substr(0, w.name.size() - 7);
      if (auto z = lookup(module + ".weight_zero_point"))
        return unsupported(fmt::format("{}: F8_E4M3 tensor '{}' has a zero point '{}' (asymmetric fp8)",
                                       file(*z), w.name, a.tensors[*z].name));
      if (auto in = lookup(module + ".input_scale")) drop[*in] = true;
    }
    const std::string scale_name = w.name + "_scale";
    std::optional<size_t> si = lookup(scale_name);
    if (!si)
      return invalid_file(
          fmt::format("{}: F8_E4M3 tensor '{}' has no scale tensor '{}'", file(i), w.name, scale_name));
    const TensorView& s = a.tensors[*si];
    if (s.dtype != DType::kF32 && s.dtype != DType::kBF16 && s.dtype != DType::kF16)
      return invalid_file(fmt::format("{}: scale tensor '{}' has dtype {}, expected F32, BF16 or F16",
                                      file(*si), s.name, loadable_dtype(s.dtype).name));
    // Rows: the product of every dimension but the last. Not TensorView::rows() (numel / cols),
    // which divides by zero for a zero-width weight such as shape [2, 0].
    int64_t rows = 1;
    for (size_t d = 0; d + 1 < w.shape.size(); ++d) rows *= w.shape[d];  // no overflow: numel was checked
    const int64_t n = s.numel();
    const bool per_tensor = n == 1;
    const bool per_row = (s.shape.size() == 1 && s.shape[0] == rows) ||
                         (s.shape.size() == 2 && s.shape[0] == rows && s.shape[1] == 1);
    if (!per_tensor && !per_row)
      return unsupported(
          fmt::format("{}: scale tensor '{}' has shape {} for weight shape {}; only a per-tensor ([] or [1]) "
                      "or per-channel "
                      "([{}] or [{}, 1]) scale is supported (group/block fp8 strategies are not)",
                      file(*si), s.name, shape_to_string(s.shape), shape_to_string(w.shape), rows, rows));
    w.row_scale.resize(n);
    for (int64_t r = 0; r < n; ++r) {
      float v = read_scale(s.dtype, static_cast<const uint8_t*>(s.data), r);
      if (!std::isfinite(v))
        return invalid_file(fmt::format("{}: scale tensor '{}' element {} is {}", file(*si), s.name, r, v));
      w.row_scale[r] = v;
    }
    drop[*si] = true;
  }

  // A `.weight_scale` that no fp8 weight consumed means a layout we do not understand.
  for (size_t i = 0; i < a.tensors.size(); ++i) {
    const std::string& name = a.tensors[i].name;
    if (drop[i] || !(ends_with(name, ".weight_scale") || ends_with(name, ".weight_scale_inv"))) continue;
    const std::string weight = name.substr(0, name.rfind("_scale"));
    std::optional<size_t> wi = lookup(weight);
    if (!wi)
      return invalid_file(
          fmt::format("{}: scale tensor '{}' has no weight '{}' beside it (int4 pack-quantized "
                      "layouts are not supported)",
                      file(i), name, weight));
    return invalid_file(fmt::format("{}: scale tensor '{}' belongs to '{}', which is {}, not F8_E4M3",
                                    file(i), name, weight, loadable_dtype(a.tensors[*wi].dtype).name));
  }

  size_t kept = 0;
  for (size_t i = 0; i < a.tensors.size(); ++i) {
    if (drop[i]) continue;
    if (kept != i) {
      a.tensors[kept] = std::move(a.tensors[i]);
      a.tensor_file[kept] = a.tensor_file[i];
    }
    ++kept;
  }
  a.tensors.resize(kept);
  a.tensor_file.resize(kept);
  return ok_status();
}

// Reads model.safetensors.index.json: {"metadata": {...}, "weight_map": {tensor: shard}}.
Status load_index(const fs::path& index_path, Assembly& a) {
  const std::string ipath = index_path.string();
  GEMMA3_ASSIGN_OR_RETURN(MappedFile f, MappedFile::open(ipath));
  json j;
  try {
    const char* p = reinterpret_cast<const char*>(f.data());
    j = json::parse(p, p + f.size());
  } catch (const json::exception& e) {
    return invalid_file(fmt::format("{}: not valid JSON: {}", ipath, e.what()));
  }
  if (!j.is_object())
    return invalid_file(fmt::format("{}: is a JSON {}, expected an object", ipath, json_type(j)));
  auto wm = j.find("weight_map");
  if (wm == j.end() || !wm->is_object())
    return invalid_file(fmt::format("{}: no 'weight_map' object (tensor name -> shard file)", ipath));

  std::map<std::string, std::vector<std::string>> shards;  // shard -> tensors, sorted by shard name
  for (const auto& [tensor, shard] : wm->items()) {
    if (!shard.is_string())
      return invalid_file(fmt::format("{}: weight_map['{}'] is a JSON {}, expected a file name", ipath,
                                      tensor, json_type(shard)));
    std::string s = shard.get<std::string>();
    fs::path sp(s);
    if (s.empty() || sp.is_absolute() ||
        std::any_of(sp.begin(), sp.end(), [](const fs::path& c) { return c == ".."; }))
      return invalid_file(
          fmt::format("{}: weight_map['{}'] = '{}' is not a file name inside the folder", ipath, tensor, s));
    shards[s].push_back(tensor);
  }
  if (shards.empty()) return invalid_file(fmt::format("{}: weight_map is empty", ipath));

  const fs::path dir = index_path.parent_path();
  std::unordered_map<std::string, uint32_t> where;  // tensor -> file index
  for (const auto& [shard, names] : shards) {
    const std::string spath = (dir / shard).string();
    std::error_code ec;
    if (!fs::exists(spath, ec))
      return not_found(fmt::format(
          "{}: weight_map puts tensor '{}'{} in shard '{}', but {} does not exist", ipath, names.front(),
          names.size() > 1 ? fmt::format(" and {} others", names.size() - 1) : "", shard, spath));
    GEMMA3_ASSIGN_OR_RETURN(ParsedFile parsed, parse_file(spath));
    GEMMA3_TRY(add_file(a, std::move(parsed), where));
  }
  for (const auto& [shard, names] : shards) {
    const std::string spath = (dir / shard).string();
    for (const std::string& t : names) {
      auto it = where.find(t);
      if (it == where.end() || a.files[it->second].path() != spath)
        return invalid_file(fmt::format(
            "{}: weight_map puts tensor '{}' in '{}', but that shard's header {}", ipath, t, shard,
            it == where.end() ? std::string("does not list it")
                              : "does not list it (it is in " + a.files[it->second].path() + ")"));
    }
  }
  // Tensors in a shard but absent from weight_map are kept: the headers are authoritative.
  return ok_status();
}

}  // namespace

Result<SafetensorsSet> SafetensorsSet::open(const std::string& path_or_folder) {
  const fs::path path(path_or_folder);
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (ec || !fs::exists(st)) return not_found(fmt::format("{}: no such file or folder", path_or_folder));

  Assembly a;
  std::unordered_map<std::string, uint32_t> where;
  if (fs::is_directory(st)) {
    const fs::path index = path / "model.safetensors.index.json";
    const fs::path single = path / "model.safetensors";
    if (fs::exists(index, ec)) {
      GEMMA3_TRY(load_index(index, a));
    } else if (fs::exists(single, ec)) {
      GEMMA3_ASSIGN_OR_RETURN(ParsedFile parsed, parse_file(single.string()));
      GEMMA3_TRY(add_file(a, std::move(parsed), where));
    } else {
      std::vector<std::string> found;
      for (fs::directory_iterator it(path, ec), end; !ec && it != end; it.increment(ec))
        if (it->path().extension() == ".safetensors") found.push_back(it->path().filename().string());
      if (ec)
        return invalid_argument(fmt::format("{}: cannot list folder: {}", path_or_folder, ec.message()));
      std::sort(found.begin(), found.end());
      if (found.empty())
        return not_found(
            fmt::format("{}: no model.safetensors.index.json, model.safetensors or other *.safetensors file "
                        "in this folder",
                        path_or_folder));
      if (found.size() > 1)
        return invalid_argument(fmt::format(
            "{}: {} *.safetensors files ({}) but no model.safetensors.index.json saying which form the model",
            path_or_folder, found.size(), fmt::join(found, ", ")));
      GEMMA3_ASSIGN_OR_RETURN(ParsedFile parsed, parse_file((path / found[0]).string()));
      GEMMA3_TRY(add_file(a, std::move(parsed), where));
    }
  } else if (ends_with(path_or_folder, ".index.json")) {
    GEMMA3_TRY(load_index(path, a));
  } else {
    GEMMA3_ASSIGN_OR_RETURN(ParsedFile parsed, parse_file(path_or_folder));
    GEMMA3_TRY(add_file(a, std::move(parsed), where));
  }
  GEMMA3_TRY(attach_fp8_scales(a));

  SafetensorsSet set;
  set.path_ = path_or_folder;
  set.files_ = std::move(a.files);
  set.tensors_ = std::move(a.tensors);
  set.tensor_file_ = std::move(a.tensor_file);
  set.rebuild_index();
  return set;
}

}  // namespace gemma3
