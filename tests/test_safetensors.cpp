// SafetensorsSet on small files written here by a minimal writer (u64 header length + JSON
// header + bytes, docs/formats.md §1.1). Expected values are hand-computed bit patterns.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "checkpoint/safetensors.h"

namespace gemma3 {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// A folder under the system temp dir, removed at the end of the test.
class TempDir {
 public:
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = fs::temp_directory_path() / ("gemma3_st_" + std::string(info->test_suite_name()) + "_" +
                                         info->name() + "_" + std::to_string(getpid()));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// u64 little-endian length + header + data.
std::string raw_file(const std::string& header, const std::string& data) {
  uint64_t n = header.size();
  std::string out(8, '\0');
  std::memcpy(out.data(), &n, 8);
  return out + header + data;
}

struct TestTensor {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};

// Tensors laid out back to back in the given order, header padded with spaces to 8 bytes
// like the reference writer.
std::string build_file(const std::vector<TestTensor>& tensors, bool metadata = true) {
  json header = json::object();
  if (metadata) header["__metadata__"] = {{"format", "pt"}};
  std::string data;
  for (const TestTensor& t : tensors) {
    header[t.name] = {{"dtype", t.dtype},
                      {"shape", t.shape},
                      {"data_offsets", {data.size(), data.size() + t.bytes.size()}}};
    data += t.bytes;
  }
  std::string h = header.dump();
  while (h.size() % 8) h += ' ';
  return raw_file(h, data);
}

template <class T>
std::string bytes_of(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

// The bytes a view points at.
std::string view_bytes(const TensorView& t) {
  return std::string(static_cast<const char*>(t.data), t.nbytes);
}

// Expects an error with `code` whose message mentions every string in `parts`.
void expect_error(const Status& s, ErrorCode code, const std::vector<std::string>& parts) {
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), code) << s.to_string();
  for (const std::string& p : parts)
    EXPECT_NE(s.message().find(p), std::string::npos) << "'" << p << "' not in: " << s.message();
}

TEST(Safetensors, RoundTripEachDtypeAndShape) {
  TempDir dir;
  // BF16 bits: 1.0 = 0x3F80, -2.0 = 0xC000, 1.5 = 0x3FC0, 0 = 0x0000.
  const std::vector<uint16_t> bf16 = {0x3F80, 0xC000, 0x3FC0, 0x0000};
  // F16 bits: 1.0 = 0x3C00, -2.0 = 0xC000, 0.5 = 0x3800, 65504 = 0x7BFF.
  const std::vector<uint16_t> f16 = {0x3C00, 0xC000, 0x3800, 0x7BFF};
  const std::vector<float> f32 = {1.0f, -2.5f, 3.25f, 0.0f, 1e-3f, 7.0f};
  const std::vector<float> scalar = {42.0f};
  // Three BF16 values first, so the following F32 starts at data offset 6 (not 4-aligned: allowed).
  const std::vector<uint16_t> odd = {0x3F80, 0x4000, 0x4040};
  const std::string path = dir.file("model.safetensors");
  write_bytes(path, build_file({{"odd", "BF16", {3}, bytes_of(odd)},
                                {"a.f32", "F32", {2, 3}, bytes_of(f32)},
                                {"b.bf16", "BF16", {4}, bytes_of(bf16)},
                                {"c.f16", "F16", {2, 2}, bytes_of(f16)},
                                {"d.scalar", "F32", {}, bytes_of(scalar)},
                                {"e.empty", "BF16", {0, 4}, ""}}));
  auto set = SafetensorsSet::open(path);
  ASSERT_TRUE(set.ok()) << set.status().to_string();
  EXPECT_EQ(set->path(), path);
  ASSERT_EQ(set->tensors().size(), 6u);  // __metadata__ is not a tensor

  const TensorView* a = set->find_tensor("a.f32");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->dtype, DType::kF32);
  EXPECT_EQ(a->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(a->nbytes, 24u);
  EXPECT_EQ(a->rows(), 2);
  EXPECT_EQ(a->cols(), 3);
  EXPECT_EQ(view_bytes(*a), bytes_of(f32));
  EXPECT_TRUE(a->row_scale.empty());
  float v;
  std::memcpy(&v, a->row_ptr(1), 4);  // row 1 starts with f32[3]
  EXPECT_EQ(v, 0.0f);
  std::memcpy(&v, static_cast<const uint8_t*>(a->data) + 4, 4);
  EXPECT_EQ(v, -2.5f);

  const TensorView* b = set->find_tensor("b.bf16");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->dtype, DType::kBF16);
  EXPECT_EQ(b->shape, (std::vector<int64_t>{4}));
  EXPECT_EQ(view_bytes(*b), bytes_of(bf16));

  const TensorView* c = set->find_tensor("c.f16");
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->dtype, DType::kF16);
  EXPECT_EQ(c->nbytes, 8u);
  EXPECT_EQ(view_bytes(*c), bytes_of(f16));

  const TensorView* d = set->find_tensor("d.scalar");
  ASSERT_NE(d, nullptr);
  EXPECT_TRUE(d->shape.empty());
  EXPECT_EQ(d->numel(), 1);
  EXPECT_EQ(view_bytes(*d), bytes_of(scalar));

  const TensorView* e = set->find_tensor("e.empty");
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->numel(), 0);
  EXPECT_EQ(e->nbytes, 0u);

  const TensorView* o = set->find_tensor("odd");
  ASSERT_NE(o, nullptr);
  EXPECT_EQ(view_bytes(*o), bytes_of(odd));
  EXPECT_EQ(static_cast<const uint8_t*>(a->data) - static_cast<const uint8_t*>(o->data), 6);

  EXPECT_EQ(set->find_tensor("missing"), nullptr);
  EXPECT_EQ(set->file_of("a.f32"), path);
  EXPECT_EQ(set->file_of("missing"), "");
}

TEST(Safetensors, SetStaysValidAfterMove) {
  TempDir dir;
  const std::vector<float> f32 = {1.0f, 2.0f};
  write_bytes(dir.file("model.safetensors"), build_file({{"w", "F32", {2}, bytes_of(f32)}}));
  auto opened = SafetensorsSet::open(dir.path().string());  // a folder with model.safetensors
  ASSERT_TRUE(opened.ok()) << opened.status().to_string();
  SafetensorsSet set = std::move(opened).value();
  SafetensorsSet moved = std::move(set);
  const TensorView* w = moved.find_tensor("w");
  ASSERT_NE(w, nullptr);
  EXPECT_EQ(view_bytes(*w), bytes_of(f32));
}

TEST(Safetensors, FolderPicksTheOnlySafetensorsFile) {
  TempDir dir;
  const std::vector<float> f32 = {3.0f};
  write_bytes(dir.file("weights.safetensors"), build_file({{"x", "F32", {1}, bytes_of(f32)}}));
  auto set = SafetensorsSet::open(dir.path().string());
  ASSERT_TRUE(set.ok()) << set.status().to_string();
  ASSERT_NE(set->find_tensor("x"), nullptr);
  EXPECT_EQ(set->file_of("x"), dir.file("weights.safetensors"));

  write_bytes(dir.file("other.safetensors"), build_file({{"y", "F32", {1}, bytes_of(f32)}}));
  expect_error(SafetensorsSet::open(dir.path().string()).status(), ErrorCode::kInvalidArgument,
               {dir.path().string(), "other.safetensors", "weights.safetensors", "index.json"});
}

TEST(Safetensors, EmptyFolderAndMissingPath) {
  TempDir dir;
  expect_error(SafetensorsSet::open(dir.path().string()).status(), ErrorCode::kNotFound,
               {dir.path().string()});
  expect_error(SafetensorsSet::open(dir.file("nope.safetensors")).status(), ErrorCode::kNotFound,
               {"nope.safetensors"});
}

void write_index(const std::string& path, const json& weight_map) {
  json index = {{"metadata", {{"total_size", 123}}}, {"weight_map", weight_map}};
  write_bytes(path, index.dump(2));
}

TEST(Safetensors, ShardedFolderWithIndex) {
  TempDir dir;
  const std::vector<float> a = {1.0f, 2.0f, 3.0f, 4.0f};
  const std::vector<uint16_t> b = {0x3F80, 0x4000};
  const std::vector<uint16_t> c = {0xC000};
  write_bytes(dir.file("model-00001-of-00002.safetensors"),
              build_file({{"model.embed_tokens.weight", "F32", {2, 2}, bytes_of(a)}}));
  write_bytes(dir.file("model-00002-of-00002.safetensors"),
              build_file({{"model.norm.weight", "BF16", {2}, bytes_of(b)},
                          {"model.layers.0.input_layernorm.weight", "BF16", {1}, bytes_of(c)}}));
  write_index(dir.file("model.safetensors.index.json"),
              {{"model.embed_tokens.weight", "model-00001-of-00002.safetensors"},
               {"model.norm.weight", "model-00002-of-00002.safetensors"},
               {"model.layers.0.input_layernorm.weight", "model-00002-of-00002.safetensors"}});
  // A stray file that the index does not mention must be ignored.
  write_bytes(dir.file("consolidated.safetensors"), "garbage");

  for (const std::string& p : {dir.path().string(), dir.file("model.safetensors.index.json")}) {
    auto set = SafetensorsSet::open(p);
    ASSERT_TRUE(set.ok()) << set.status().to_string();
    EXPECT_EQ(set->path(), p);
    ASSERT_EQ(set->tensors().size(), 3u);
    const TensorView* e = set->find_tensor("model.embed_tokens.weight");
    ASSERT_NE(e, nullptr);
    EXPECT_EQ(view_bytes(*e), bytes_of(a));
    EXPECT_EQ(set->file_of("model.embed_tokens.weight"), dir.file("model-00001-of-00002.safetensors"));
    const TensorView* n = set->find_tensor("model.norm.weight");
    ASSERT_NE(n, nullptr);
    EXPECT_EQ(view_bytes(*n), bytes_of(b));
    EXPECT_EQ(set->file_of("model.norm.weight"), dir.file("model-00002-of-00002.safetensors"));
    EXPECT_EQ(set->file_paths().size(), 2u);
  }
}

TEST(Safetensors, IndexErrors) {
  TempDir dir;
  const std::vector<float> a = {1.0f};
  write_bytes(dir.file("s1.safetensors"), build_file({{"t1", "F32", {1}, bytes_of(a)}}));
  write_bytes(dir.file("s2.safetensors"), build_file({{"t1", "F32", {1}, bytes_of(a)}}));
  const std::string index = dir.file("model.safetensors.index.json");

  // A shard named by the index is missing.
  write_index(index, {{"t1", "s1.safetensors"}, {"t2", "s9.safetensors"}});
  expect_error(SafetensorsSet::open(dir.path().string()).status(), ErrorCode::kNotFound,
               {index, "s9.safetensors", "t2"});

  // The same tensor in two shards.
  write_index(index, {{"t1", "s1.safetensors"}, {"x", "s2.safetensors"}});
  expect_error(SafetensorsSet::open(dir.path().string()).status(), ErrorCode::kInvalidFile,
               {"t1", dir.file("s1.safetensors"), dir.file("s2.safetensors")});

  // The index puts a tensor in a shard whose header lacks it.
  write_index(index, {{"t1", "s1.safetensors"}, {"t3", "s1.safetensors"}});
  expect_error(SafetensorsSet::open(dir.path().string()).status(), ErrorCode::kInvalidFile,
               {index, "t3", "s1.safetensors"});

  // Shard names may not leave the folder.
  write_index(index, {{"t1", "../s1.safetensors"}});
  expect_error(SafetensorsSet::open(dir.path().string()).status(), ErrorCode::kInvalidFile, {index, "t1"});

  // Not JSON / no weight_map.
  write_bytes(index, "{\"metadata\": ");
  expect_error(SafetensorsSet::open(dir.path().string()).status(), ErrorCode::kInvalidFile, {index, "JSON"});
  write_bytes(index, "{\"metadata\": {}}");
  expect_error(SafetensorsSet::open(dir.path().string()).status(), ErrorCode::kInvalidFile,
               {index, "weight_map"});
}

TEST(Safetensors, Fp8PerChannelScaleIsAttached) {
  TempDir dir;
  // E4M3 bits: 0x38 = 1.0 (e=7, m=0), 0xC0 = -2.0, 0x30 = 0.5, 0x00 = 0.
  const std::string w8 = std::string("\x38\xC0\x30\x00\x38\x38\x38\x38", 8);
  // BF16 scales [2, 1]: 0.5 = 0x3F00, 2.0 = 0x4000.
  const std::vector<uint16_t> scale = {0x3F00, 0x4000};
  const std::vector<float> input_scale = {0.25f};
  const std::vector<uint16_t> norm = {0x3F80, 0x3F80, 0x3F80, 0x3F80};
  const std::string path = dir.file("model.safetensors");
  write_bytes(path, build_file({{"model.layers.0.mlp.up_proj.weight", "F8_E4M3", {2, 4}, w8},
                                {"model.layers.0.mlp.up_proj.weight_scale", "BF16", {2, 1}, bytes_of(scale)},
                                {"model.layers.0.mlp.up_proj.input_scale", "F32", {1}, bytes_of(input_scale)},
                                {"model.norm.weight", "BF16", {4}, bytes_of(norm)}}));
  auto set = SafetensorsSet::open(path);
  ASSERT_TRUE(set.ok()) << set.status().to_string();
  ASSERT_EQ(set->tensors().size(), 2u);  // the scales are folded in
  EXPECT_EQ(set->find_tensor("model.layers.0.mlp.up_proj.weight_scale"), nullptr);
  EXPECT_EQ(set->find_tensor("model.layers.0.mlp.up_proj.input_scale"), nullptr);
  const TensorView* w = set->find_tensor("model.layers.0.mlp.up_proj.weight");
  ASSERT_NE(w, nullptr);
  EXPECT_EQ(w->dtype, DType::kF8E4M3);
  EXPECT_EQ(w->shape, (std::vector<int64_t>{2, 4}));
  EXPECT_EQ(view_bytes(*w), w8);
  EXPECT_EQ(w->row_scale, (std::vector<float>{0.5f, 2.0f}));
  const TensorView* n = set->find_tensor("model.norm.weight");
  ASSERT_NE(n, nullptr);
  EXPECT_TRUE(n->row_scale.empty());
}

TEST(Safetensors, Fp8ScaleShapesAndDtypes) {
  TempDir dir;
  const std::string w8(6, '\x38');  // [3, 2]
  const std::string path = dir.file("model.safetensors");
  auto open_with = [&](const std::string& dtype, std::vector<int64_t> shape, const std::string& bytes) {
    write_bytes(path,
                build_file({{"q.weight", "F8_E4M3", {3, 2}, w8}, {"q.weight_scale", dtype, shape, bytes}}));
    return SafetensorsSet::open(path);
  };
  // Per-tensor F32 scalar.
  {
    auto set = open_with("F32", {}, bytes_of(std::vector<float>{0.125f}));
    ASSERT_TRUE(set.ok()) << set.status().to_string();
    EXPECT_EQ(set->find_tensor("q.weight")->row_scale, (std::vector<float>{0.125f}));
  }
  // Per-tensor [1] F32.
  {
    auto set = open_with("F32", {1}, bytes_of(std::vector<float>{3.0f}));
    ASSERT_TRUE(set.ok()) << set.status().to_string();
    EXPECT_EQ(set->find_tensor("q.weight")->row_scale, (std::vector<float>{3.0f}));
  }
  // Per-channel [rows] F16: 1.0 = 0x3C00, 4.0 = 0x4400, 0.5 = 0x3800.
  {
    auto set = open_with("F16", {3}, bytes_of(std::vector<uint16_t>{0x3C00, 0x4400, 0x3800}));
    ASSERT_TRUE(set.ok()) << set.status().to_string();
    EXPECT_EQ(set->find_tensor("q.weight")->row_scale, (std::vector<float>{1.0f, 4.0f, 0.5f}));
  }
  // Group scales [3, 2] cannot be one value per row.
  expect_error(open_with("F32", {3, 2}, bytes_of(std::vector<float>(6, 1.0f))).status(),
               ErrorCode::kUnsupported, {path, "q.weight_scale", "[3, 2]"});
  // Wrong row count.
  expect_error(open_with("F32", {2, 1}, bytes_of(std::vector<float>(2, 1.0f))).status(),
               ErrorCode::kUnsupported, {path, "q.weight_scale"});
  // Scale stored as fp8.
  expect_error(open_with("F8_E4M3", {3}, std::string(3, '\x38')).status(), ErrorCode::kInvalidFile,
               {path, "q.weight_scale", "F8_E4M3"});
}

TEST(Safetensors, Fp8Errors) {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  const std::string w8(4, '\x38');
  // No scale at all.
  write_bytes(path, build_file({{"k.weight", "F8_E4M3", {2, 2}, w8}}));
  expect_error(SafetensorsSet::open(path).status(), ErrorCode::kInvalidFile,
               {path, "k.weight", "k.weight_scale"});
  // HF block-fp8 convention.
  write_bytes(path, build_file({{"k.weight", "F8_E4M3", {2, 2}, w8},
                                {"k.weight_scale_inv", "F32", {1, 1}, bytes_of(std::vector<float>{1.0f})}}));
  expect_error(SafetensorsSet::open(path).status(), ErrorCode::kUnsupported, {path, "k.weight", "scale_inv"});
  // A scale next to a weight that is not fp8.
  write_bytes(path, build_file({{"k.weight", "BF16", {2}, std::string(4, '\0')},
                                {"k.weight_scale", "F32", {1}, bytes_of(std::vector<float>{1.0f})}}));
  expect_error(SafetensorsSet::open(path).status(), ErrorCode::kInvalidFile,
               {path, "k.weight_scale", "BF16"});
  // The scale may live in another shard.
  write_bytes(dir.file("a.safetensors"), build_file({{"k.weight", "F8_E4M3", {2, 2}, w8}}));
  write_bytes(dir.file("b.safetensors"),
              build_file({{"k.weight_scale", "F32", {2, 1}, bytes_of(std::vector<float>{2.0f, 3.0f})}}));
  write_index(dir.file("model.safetensors.index.json"),
              {{"k.weight", "a.safetensors"}, {"k.weight_scale", "b.safetensors"}});
  auto set = SafetensorsSet::open(dir.path().string());
  ASSERT_TRUE(set.ok()) << set.status().to_string();
  EXPECT_EQ(set->tensors().size(), 1u);
  EXPECT_EQ(set->find_tensor("k.weight")->row_scale, (std::vector<float>{2.0f, 3.0f}));
}

// One malformed-file case: bytes written to model.safetensors, expected code and message parts.
struct BadCase {
  const char* what;
  std::string bytes;
  ErrorCode code;
  std::vector<std::string> parts;  // besides the file path
};

TEST(Safetensors, MalformedFilesAreRejectedWithNamedErrors) {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  const std::string f4 = bytes_of(std::vector<float>{1.0f});
  auto entry = [](const char* dtype, json shape, uint64_t b, uint64_t e) {
    return json{{"dtype", dtype}, {"shape", shape}, {"data_offsets", {b, e}}};
  };
  std::string huge_len(8, '\0');
  const uint64_t huge = 200'000'000;
  std::memcpy(huge_len.data(), &huge, 8);

  const std::vector<BadCase> cases = {
      {"zero-length file", "", ErrorCode::kInvalidFile, {"0 bytes"}},
      {"shorter than the length field", "abc", ErrorCode::kInvalidFile, {"3 bytes"}},
      {"truncated header",
       raw_file(json{{"t", entry("F32", {1}, 0, 4)}}.dump(), f4).substr(0, 20),
       ErrorCode::kInvalidFile,
       {"header length", "past the end"}},
      {"absurd header length", huge_len + "{}", ErrorCode::kInvalidFile, {"200000000"}},
      {"header not JSON", raw_file("{\"t\": {\"dtype\": ", ""), ErrorCode::kInvalidFile, {"not valid JSON"}},
      {"header is an array",
       raw_file("[1, 2]", ""),
       ErrorCode::kInvalidFile,
       {"array", "expected an object"}},
      {"entry not an object", raw_file(json{{"t", 3}}.dump(), ""), ErrorCode::kInvalidFile, {"'t'"}},
      {"offsets past EOF",
       raw_file(json{{"t", entry("F32", {2}, 0, 8)}}.dump(), f4),
       ErrorCode::kInvalidFile,
       {"'t'", "past the end"}},
      {"overlap",
       raw_file(json{{"a", entry("F32", {1}, 0, 4)}, {"b", entry("F32", {1}, 2, 6)}}.dump(),
                f4 + f4.substr(0, 2)),
       ErrorCode::kInvalidFile,
       {"'b'", "overlaps", "'a'"}},
      {"hole",
       raw_file(json{{"a", entry("F32", {1}, 4, 8)}}.dump(), f4 + f4),
       ErrorCode::kInvalidFile,
       {"'a'", "hole"}},
      {"trailing bytes",
       raw_file(json{{"a", entry("F32", {1}, 0, 4)}}.dump(), f4 + f4),
       ErrorCode::kInvalidFile,
       {"'a'", "left over"}},
      {"wrong size",
       raw_file(json{{"t", entry("BF16", {3}, 0, 4)}}.dump(), f4),
       ErrorCode::kInvalidFile,
       {"'t'", "[3]", "needs 6"}},
      {"end before begin",
       raw_file(json{{"t", entry("F32", {1}, 4, 0)}}.dump(), f4),
       ErrorCode::kInvalidFile,
       {"'t'", "[4, 0]"}},
      {"unknown dtype",
       raw_file(json{{"t", entry("Q9", {1}, 0, 4)}}.dump(), f4),
       ErrorCode::kInvalidFile,
       {"'t'", "Q9"}},
      {"unsupported dtype I32",
       raw_file(json{{"m.weight_packed", entry("I32", {1}, 0, 4)}}.dump(), f4),
       ErrorCode::kUnsupported,
       {"m.weight_packed", "I32", "compressed-tensors"}},
      {"unsupported dtype F64",
       raw_file(json{{"t", entry("F64", {1}, 0, 8)}}.dump(), f4 + f4),
       ErrorCode::kUnsupported,
       {"'t'", "F64"}},
      {"negative dim",
       raw_file(json{{"t", entry("F32", {-1}, 0, 4)}}.dump(), f4),
       ErrorCode::kInvalidFile,
       {"'t'", "shape"}},
      {"shape overflow",
       raw_file(json{{"t", entry("F32", {1ll << 40, 1ll << 40}, 0, 4)}}.dump(), f4),
       ErrorCode::kInvalidFile,
       {"'t'", "2^63"}},
      {"missing data_offsets",
       raw_file(json{{"t", {{"dtype", "F32"}, {"shape", {1}}}}}.dump(), f4),
       ErrorCode::kInvalidFile,
       {"'t'", "data_offsets"}},
      {"duplicate name",
       raw_file(R"({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},)"
                R"( "t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})",
                f4),
       ErrorCode::kInvalidFile,
       {"'t'", "twice"}},
  };
  for (const BadCase& c : cases) {
    SCOPED_TRACE(c.what);
    write_bytes(path, c.bytes);
    auto r = SafetensorsSet::open(path);
    std::vector<std::string> parts = c.parts;
    parts.push_back(path);
    expect_error(r.status(), c.code, parts);
  }
}

TEST(Safetensors, HeaderWhitespacePaddingIsAccepted) {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  const std::vector<float> f = {5.0f};
  const std::string header =
      std::string("  \n") + R"({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})" + "     ";
  write_bytes(path, raw_file(header, bytes_of(f)));
  auto set = SafetensorsSet::open(path);
  ASSERT_TRUE(set.ok()) << set.status().to_string();
  EXPECT_EQ(view_bytes(*set->find_tensor("t")), bytes_of(f));
}

// The tiny random model in tests/data/tiny was written by the reference Python writer
// (safetensors via transformers 5.24); its header was read with Python's json module to get
// the values below.
TEST(Safetensors, ReferenceWrittenTinyModel) {
  const std::string folder = std::string(GEMMA3_SOURCE_DIR) + "/tests/data/tiny";
  const std::string file = folder + "/model.safetensors";
  if (!fs::exists(file)) GTEST_SKIP() << file << " is not present";
  auto set = SafetensorsSet::open(folder);
  ASSERT_TRUE(set.ok()) << set.status().to_string();
  EXPECT_EQ(set->tensors().size(), 2u + 13u * 8u);  // embed + final norm + 13 per layer, 8 layers
  const TensorView* embed = set->find_tensor("model.embed_tokens.weight");
  ASSERT_NE(embed, nullptr);
  EXPECT_EQ(embed->dtype, DType::kF32);
  EXPECT_EQ(embed->shape, (std::vector<int64_t>{512, 96}));
  const TensorView* q = set->find_tensor("model.layers.0.self_attn.q_proj.weight");
  ASSERT_NE(q, nullptr);
  EXPECT_EQ(q->shape, (std::vector<int64_t>{128, 96}));
  EXPECT_EQ(set->find_tensor("model.norm.weight")->shape, (std::vector<int64_t>{96}));
  // embed_tokens has data_offsets [0, 196608] and the header is 11184 bytes: compare the
  // view's bytes with the file read independently.
  std::ifstream f(file, std::ios::binary);
  std::string bytes(196608, '\0');
  f.seekg(8 + 11184);
  f.read(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(f.good());
  EXPECT_EQ(view_bytes(*embed), bytes);
}

}  // namespace
}  // namespace gemma3
