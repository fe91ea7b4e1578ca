// GGUF reader and writer: round trips through GgufWriter, split files, one test per kind of
// malformed file (each asserting the error code and that the message names file and
// problem), and the real 270M checkpoint when it is present.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "checkpoint/gguf.h"
#include "core/quant.h"
#include "dev/gguf_writer.h"
#include "test_util.h"

namespace gemma3 {
namespace {

namespace fs = std::filesystem;
using ::testing::AnyOf;
using ::testing::HasSubstr;

using Bytes = std::vector<uint8_t>;

// A fresh directory per test (named after the test, so reruns reuse it rather than pile up).
std::string test_dir() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  fs::path dir = fs::path(::testing::TempDir()) /
                 (std::string("gemma3_gguf_") + info->test_suite_name() + "_" + info->name());
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

Bytes read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(f), {});
}

void write_bytes(const std::string& path, const Bytes& b) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

// Offset of the only occurrence of `needle` in b (fails the test if not exactly one).
size_t find_unique(const Bytes& b, std::string_view needle) {
  size_t found = SIZE_MAX;
  int count = 0;
  for (size_t i = 0; i + needle.size() <= b.size(); ++i) {
    if (std::memcmp(b.data() + i, needle.data(), needle.size()) == 0) {
      found = i;
      ++count;
    }
  }
  EXPECT_EQ(count, 1) << "needle '" << needle << "'";
  return found;
}

template <class T>
void poke(Bytes& b, size_t at, T v) {
  ASSERT_LE(at + sizeof(T), b.size());
  std::memcpy(b.data() + at, &v, sizeof(T));
}

Bytes iota_bytes(uint64_t n, uint8_t seed) {
  Bytes b(n);
  for (uint64_t i = 0; i < n; ++i) b[i] = static_cast<uint8_t>(seed + i * 7);
  return b;
}

// Writes w with deterministic tensor bytes (tensor i: iota_bytes(nbytes, i)).
void write_file(const GgufWriter& w, const std::string& path) {
  std::vector<Bytes> data;
  for (size_t i = 0; i < w.tensors().size(); ++i)
    data.push_back(iota_bytes(w.tensors()[i].nbytes, static_cast<uint8_t>(i)));
  Status st = w.write(path, data);
  ASSERT_TRUE(st.ok()) << st.to_string();
}

// A small valid file: a few keys and three tensors (sizes multiples of 32, so the file ends
// exactly at the end of the last tensor).
GgufWriter small_writer() {
  GgufWriter w;
  w.set_string("general.architecture", "gemma3");
  w.set_u32("gemma3.block_count", 18);
  w.set_u32_array("some.array", {1, 2, 3});
  w.set_string_array("some.strings", {"a", "bc"});
  EXPECT_TRUE(w.add_tensor("a.weight", DType::kQ8_0, {2, 64}).ok());  // 4 blocks = 136 bytes
  EXPECT_TRUE(w.add_tensor("b.weight", DType::kF16, {16}).ok());      // 32 bytes
  EXPECT_TRUE(w.add_tensor("c.weight", DType::kF32, {8}).ok());       // 32 bytes
  return w;
}

void expect_open_error(const std::string& path, ErrorCode code, const std::string& what) {
  Result<GgufFile> r = GgufFile::open(path);
  ASSERT_FALSE(r.ok()) << "expected an error mentioning '" << what << "'";
  EXPECT_EQ(r.status().code(), code) << r.status().to_string();
  EXPECT_THAT(r.status().message(), HasSubstr(what));
  EXPECT_THAT(r.status().message(), HasSubstr(path));
}

// ---- round trips ------------------------------------------------------------------------------

TEST(Gguf, MetadataRoundTripEveryType) {
  std::string path = test_dir() + "/meta.gguf";
  GgufWriter w;
  w.set_u8("t.u8", 200);
  w.set_i8("t.i8", -100);
  w.set_u16("t.u16", 60000);
  w.set_i16("t.i16", -30000);
  w.set_u32("t.u32", 4000000000u);
  w.set_i32("t.i32", -2000000000);
  w.set_u64("t.u64", (uint64_t{1} << 40) + 3);
  w.set_u64("t.u64big", ~uint64_t{0});
  w.set_i64("t.i64", -(int64_t{1} << 40));
  w.set_f32("t.f32", 0.5f);
  w.set_f64("t.f64", 1e300);
  w.set_bool("t.bool", true);
  w.set_bool("t.false", false);
  w.set_string("t.str", "h\xc3\xa9llo");
  w.set_string("t.empty", "");
  w.set_string_array("t.strs", {"a", "", "<0x0A>", "\xe2\x96\x81the"});
  w.set_f32_array("t.f32s", {1.5f, -2.0f});
  w.set_i32_array("t.i32s", {-1, 7});
  w.set_u32_array("t.u32s", {1, 4000000000u});
  w.set_bool_array("t.bools", {true, false, true});
  w.set_u32("t.replaced", 1);
  w.set_u32("t.replaced", 2);  // replaces in place
  write_file(w, path);

  Result<GgufFile> r = GgufFile::open(path);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  const GgufFile& f = *r;
  EXPECT_EQ(f.path(), path);
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.alignment(), 32u);
  EXPECT_TRUE(f.tensors().empty());

  EXPECT_EQ(f.get_int("t.u8").value(), 200);
  EXPECT_EQ(f.get_int("t.i8").value(), -100);
  EXPECT_EQ(f.get_int("t.u16").value(), 60000);
  EXPECT_EQ(f.get_int("t.i16").value(), -30000);
  EXPECT_EQ(f.get_int("t.u32").value(), 4000000000LL);
  EXPECT_EQ(f.get_int("t.i32").value(), -2000000000LL);
  EXPECT_EQ(f.get_int("t.u64").value(), (int64_t{1} << 40) + 3);
  EXPECT_EQ(f.get_int("t.i64").value(), -(int64_t{1} << 40));
  EXPECT_EQ(f.get_int("t.replaced").value(), 2);
  EXPECT_EQ(f.get_float("t.f32").value(), 0.5);
  EXPECT_EQ(f.get_float("t.f64").value(), 1e300);
  EXPECT_EQ(f.get_float("t.u32").value(), 4e9);  // integers widen to float too
  EXPECT_EQ(f.get_bool("t.bool").value(), true);
  EXPECT_EQ(f.get_bool("t.false").value(), false);
  EXPECT_EQ(f.get_string("t.str").value(), "h\xc3\xa9llo");
  EXPECT_EQ(f.get_string("t.empty").value(), "");
  EXPECT_EQ(f.get_string_array("t.strs").value(),
            (std::vector<std::string>{"a", "", "<0x0A>", "\xe2\x96\x81the"}));
  EXPECT_EQ(f.get_float_array("t.f32s").value(), (std::vector<float>{1.5f, -2.0f}));
  EXPECT_EQ(f.get_float_array("t.i32s").value(), (std::vector<float>{-1.0f, 7.0f}));
  EXPECT_EQ(f.get_int_array("t.i32s").value(), (std::vector<int64_t>{-1, 7}));
  EXPECT_EQ(f.get_int_array("t.u32s").value(), (std::vector<int64_t>{1, 4000000000LL}));
  EXPECT_EQ(f.get_int_array("t.bools").value(), (std::vector<int64_t>{1, 0, 1}));
  EXPECT_EQ(f.array_size("t.strs").value(), 4u);
  EXPECT_EQ(f.type_of("t.f64").value(), GgufType::kFloat64);
  EXPECT_EQ(f.type_of("t.bools").value(), GgufType::kArray);

  std::vector<std::string> keys = f.keys();
  ASSERT_EQ(keys.size(), 21u);
  EXPECT_EQ(keys.front(), "t.u8");
  EXPECT_EQ(keys.back(), "t.replaced");
  EXPECT_TRUE(f.has("t.bool"));
  EXPECT_FALSE(f.has("t.nope"));

  EXPECT_EQ(f.value_to_string("t.u8"), "200");
  EXPECT_EQ(f.value_to_string("t.i64"), "-1099511627776");
  EXPECT_EQ(f.value_to_string("t.f32"), "0.5");
  EXPECT_EQ(f.value_to_string("t.bool"), "true");
  EXPECT_EQ(f.value_to_string("t.str"), "\"h\xc3\xa9llo\"");
  EXPECT_EQ(f.value_to_string("t.i32s"), "[-1, 7] (2 elements)");
  EXPECT_EQ(f.value_to_string("t.nope"), "<missing>");
  EXPECT_LE(f.value_to_string("t.strs", 10).size(), 10u + std::string(" (4 elements)").size());

  // Wrong type and missing key: errors naming key, types and file.
  Result<int64_t> bad = f.get_int("t.str");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), ErrorCode::kInvalidFile);
  EXPECT_THAT(bad.status().message(), HasSubstr("key 't.str' has type STRING, expected an integer"));
  EXPECT_THAT(bad.status().message(), HasSubstr(path));
  EXPECT_FALSE(f.get_int("t.bool").ok());  // BOOL is not an integer
  EXPECT_THAT(f.get_bool("t.u8").status().message(), HasSubstr("has type UINT8, expected BOOL"));
  EXPECT_THAT(f.get_string("t.strs").status().message(), HasSubstr("ARRAY[STRING]"));
  EXPECT_FALSE(f.get_string_array("t.i32s").ok());
  EXPECT_FALSE(f.get_int_array("t.f32s").ok());
  EXPECT_FALSE(f.get_float("t.str").ok());
  Result<std::string> missing = f.get_string("t.nope");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), ErrorCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("key 't.nope' not found in " + path));
  // A UINT64 above INT64_MAX does not silently wrap.
  EXPECT_EQ(f.get_int("t.u64big").status().code(), ErrorCode::kOutOfRange);
}

TEST(Gguf, TensorRoundTripSeveralTypes) {
  std::string dir = test_dir();
  for (uint32_t alignment : {32u, 64u}) {
    SCOPED_TRACE(alignment);
    std::string path = dir + "/tensors" + std::to_string(alignment) + ".gguf";
    GgufWriter w;
    if (alignment != 32) w.set_alignment(alignment);
    w.set_string("general.architecture", "gemma3");
    struct Decl {
      const char* name;
      DType t;
      std::vector<int64_t> shape;
    };
    const Decl decls[] = {
        {"f32", DType::kF32, {2, 3}},      {"f16", DType::kF16, {5}},
        {"bf16", DType::kBF16, {3, 1, 2}}, {"q8", DType::kQ8_0, {2, 64}},
        {"q4k", DType::kQ4_K, {3, 256}},   {"q6k", DType::kQ6_K, {1, 1, 2, 256}},
        {"q5_0", DType::kQ5_0, {4, 32}},   {"empty", DType::kF32, {0, 8}},
    };
    for (const Decl& d : decls) ASSERT_TRUE(w.add_tensor(d.name, d.t, d.shape).ok());
    // Streamed in odd-sized chunks through the sink.
    Status st = w.write(path, [](size_t i, const GgufWriter::TensorInfo& t, GgufSink& sink) -> Status {
      Bytes b = iota_bytes(t.nbytes, static_cast<uint8_t>(i));
      for (uint64_t at = 0; at < b.size(); at += 7) {
        GEMMA3_TRY(sink.write(b.data() + at, std::min<uint64_t>(7, b.size() - at)));
      }
      return ok_status();
    });
    ASSERT_TRUE(st.ok()) << st.to_string();

    Result<GgufFile> r = GgufFile::open(path);
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    EXPECT_EQ(r->alignment(), alignment);
    ASSERT_EQ(r->tensors().size(), std::size(decls));
    for (size_t i = 0; i < std::size(decls); ++i) {
      const TensorView* t = r->find_tensor(decls[i].name);
      ASSERT_NE(t, nullptr) << decls[i].name;
      EXPECT_EQ(&r->tensors()[i], t);
      EXPECT_EQ(t->dtype, decls[i].t);
      EXPECT_EQ(t->shape, decls[i].shape);
      EXPECT_EQ(t->nbytes, w.tensors()[i].nbytes);
      if (t->nbytes == 0) continue;
      // mmap bases are page aligned, so file-relative alignment shows in the pointer.
      EXPECT_EQ(reinterpret_cast<uintptr_t>(t->data) % alignment, 0u);
      Bytes expect = iota_bytes(t->nbytes, static_cast<uint8_t>(i));
      EXPECT_EQ(std::memcmp(t->data, expect.data(), t->nbytes), 0) << decls[i].name;
    }
    EXPECT_EQ(r->find_tensor("q8")->nbytes, 2u * 2u * 34u);
    EXPECT_EQ(r->find_tensor("q6k")->rows(), 2);
    EXPECT_EQ(r->find_tensor("nope"), nullptr);

    // Moving the file keeps the views valid (the mappings move with it).
    GgufFile moved = std::move(r).value();
    Bytes expect = iota_bytes(moved.find_tensor("q4k")->nbytes, 4);
    EXPECT_EQ(std::memcmp(moved.find_tensor("q4k")->data, expect.data(), expect.size()), 0);
  }
}

TEST(Gguf, QuantizedTensorDequantizesAfterRoundTrip) {
  // Values stored through the writer read back through the mapped view.
  std::string path = test_dir() + "/q8.gguf";
  std::vector<float> x(64);
  for (int i = 0; i < 64; ++i) x[i] = static_cast<float>(i - 32) * 0.25f;
  Bytes q(row_bytes(DType::kQ8_0, 64).value());
  quantize_row(DType::kQ8_0, x.data(), q.data(), 64);
  GgufWriter w;
  ASSERT_TRUE(w.add_tensor("w", DType::kQ8_0, {1, 64}).ok());
  ASSERT_TRUE(w.write(path, std::vector<Bytes>{q}).ok());
  auto r = GgufFile::open(path);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  std::vector<float> y(64);
  dequantize_row(DType::kQ8_0, r->find_tensor("w")->row_ptr(0), y.data(), 64);
  std::vector<float> y_mem(64);
  dequantize_row(DType::kQ8_0, q.data(), y_mem.data(), 64);
  EXPECT_EQ(y, y_mem);
}

TEST(Gguf, VersionTwoIsAccepted) {
  std::string path = test_dir() + "/v2.gguf";
  GgufWriter w = small_writer();
  w.set_version(2);
  write_file(w, path);
  auto r = GgufFile::open(path);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_EQ(r->version(), 2u);
  EXPECT_EQ(r->tensors().size(), 3u);
}

TEST(Gguf, WriterChecksCallbackSizeAndShapes) {
  std::string path = test_dir() + "/short.gguf";
  GgufWriter w;
  ASSERT_TRUE(w.add_tensor("t", DType::kF32, {4}).ok());
  Status st = w.write(path, [](size_t, const GgufWriter::TensorInfo&, GgufSink& sink) {
    float v = 1;
    return sink.write(&v, 4);  // 4 of 16 bytes
  });
  EXPECT_FALSE(st.ok());
  EXPECT_THAT(st.message(), HasSubstr("wrote 4 bytes, expected 16"));
  EXPECT_FALSE(fs::exists(path));
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  EXPECT_FALSE(w.add_tensor("bad", DType::kQ4_K, {2, 640}).ok());
  EXPECT_FALSE(w.add_tensor("bad", DType::kF32, {}).ok());
  EXPECT_FALSE(w.add_tensor("bad", DType::kF8E4M3, {4}).ok());
}

TEST(Gguf, LargeTokenArrayIsFast) {
  std::string path = test_dir() + "/tokens.gguf";
  const int n = 262144;
  std::vector<std::string> tokens(n);
  std::vector<float> scores(n);
  std::vector<int32_t> types(n);
  for (int i = 0; i < n; ++i) {
    tokens[i] = "tok" + std::to_string(i);
    scores[i] = -static_cast<float>(i);
    types[i] = 1;
  }
  GgufWriter w;
  w.set_string_array("tokenizer.ggml.tokens", tokens);
  w.set_f32_array("tokenizer.ggml.scores", scores);
  w.set_i32_array("tokenizer.ggml.token_type", types);
  ASSERT_TRUE(w.write(path, std::vector<Bytes>{}).ok());

  auto start = std::chrono::steady_clock::now();
  auto r = GgufFile::open(path);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  auto got = r->get_string_array("tokenizer.ggml.tokens");
  auto got_scores = r->get_float_array("tokenizer.ggml.scores");
  auto got_types = r->get_int_array("tokenizer.ggml.token_type");
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_TRUE(got.ok() && got_scores.ok() && got_types.ok());
  EXPECT_EQ(*got, tokens);
  EXPECT_EQ(got_scores->at(n - 1), -static_cast<float>(n - 1));
  EXPECT_EQ(got_types->size(), static_cast<size_t>(n));
  EXPECT_LT(seconds, 1.0);
  EXPECT_THAT(r->value_to_string("tokenizer.ggml.tokens"), HasSubstr("(262144 elements)"));
}

// ---- split files ----------------------------------------------------------------------------

// Writes <dir>/m-0000k-of-00003.gguf; shard 1 holds the metadata and 2 tensors, shard 2 one,
// shard 3 two. Returns the first shard's path.
std::string write_split(const std::string& dir, int declared_total = 5, const char* dup_name = nullptr) {
  const std::vector<std::vector<std::string>> names = {
      {"t0", "t1"}, {"t2"}, {"t3", dup_name ? dup_name : "t4"}};
  for (int k = 0; k < 3; ++k) {
    GgufWriter w;
    if (k == 0) {
      w.set_string("general.architecture", "gemma3");
      w.set_u32("gemma3.block_count", 2);
    }
    w.set_u16("split.no", static_cast<uint16_t>(k));
    w.set_u16("split.count", 3);
    w.set_i32("split.tensors.count", declared_total);
    std::vector<Bytes> data;
    for (const std::string& n : names[k]) {
      EXPECT_TRUE(w.add_tensor(n, DType::kF32, {2, 4}).ok());
      data.push_back(iota_bytes(32, static_cast<uint8_t>(n[1])));
    }
    std::string p = dir + "/m-0000" + std::to_string(k + 1) + "-of-00003.gguf";
    EXPECT_TRUE(w.write(p, data).ok());
  }
  return dir + "/m-00001-of-00003.gguf";
}

TEST(Gguf, SplitFilesLoadAllShards) {
  std::string dir = test_dir();
  std::string first = write_split(dir);
  auto r = GgufFile::open(first);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_EQ(r->shard_count(), 3u);
  EXPECT_EQ(r->get_string("general.architecture").value(), "gemma3");
  ASSERT_EQ(r->tensors().size(), 5u);
  for (const char* n : {"t0", "t1", "t2", "t3", "t4"}) {
    const TensorView* t = r->find_tensor(n);
    ASSERT_NE(t, nullptr) << n;
    Bytes expect = iota_bytes(32, static_cast<uint8_t>(n[1]));
    EXPECT_EQ(std::memcmp(t->data, expect.data(), 32), 0) << n;
  }
  // Naming any shard opens the whole set.
  auto r2 = GgufFile::open(dir + "/m-00002-of-00003.gguf");
  ASSERT_TRUE(r2.ok()) << r2.status().to_string();
  EXPECT_EQ(r2->tensors().size(), 5u);
}

TEST(Gguf, SplitMissingShard) {
  std::string dir = test_dir();
  std::string first = write_split(dir);
  fs::remove(dir + "/m-00003-of-00003.gguf");
  auto r = GgufFile::open(first);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kNotFound);
  EXPECT_THAT(r.status().message(), HasSubstr("m-00003-of-00003.gguf"));
}

TEST(Gguf, SplitTensorCountMismatch) {
  std::string dir = test_dir();
  std::string first = write_split(dir, /*declared_total=*/6);
  expect_open_error(first, ErrorCode::kInvalidFile,
                    "split.tensors.count = 6, but the 3 shards hold 5 tensors");
}

TEST(Gguf, SplitDuplicateTensorAcrossShards) {
  std::string dir = test_dir();
  write_split(dir, 5, "t0");
  auto r = GgufFile::open(dir + "/m-00001-of-00003.gguf");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kInvalidFile);
  // Names the shard holding the second copy.
  EXPECT_THAT(r.status().message(), HasSubstr("m-00003-of-00003.gguf: duplicate tensor name 't0'"));
}

TEST(Gguf, SplitCountMismatch) {
  std::string dir = test_dir();
  write_split(dir);
  // Present the three shards as a 2-shard set: shard 1 says split.count = 3.
  fs::rename(dir + "/m-00001-of-00003.gguf", dir + "/m-00001-of-00002.gguf");
  fs::rename(dir + "/m-00002-of-00003.gguf", dir + "/m-00002-of-00002.gguf");
  expect_open_error(dir + "/m-00001-of-00002.gguf", ErrorCode::kInvalidFile,
                    "split.count = 3, but the file name says 2 shards");
}

// ---- malformed files: one test per check --------------------------------------------------------

class GgufBad : public ::testing::Test {
 protected:
  void SetUp() override { path_ = test_dir() + "/bad.gguf"; }
  // Writes w, applies `edit` to the bytes, and expects open to fail with code and message.
  template <class Edit>
  void expect_bad(const GgufWriter& w, Edit edit, ErrorCode code, const std::string& what) {
    write_file(w, path_);
    Bytes b = read_bytes(path_);
    edit(b);
    write_bytes(path_, b);
    expect_open_error(path_, code, what);
  }
  void expect_bad(const GgufWriter& w, ErrorCode code, const std::string& what) {
    expect_bad(
        w, [](Bytes&) {}, code, what);
  }
  std::string path_;
};

TEST_F(GgufBad, SmallWriterIsValid) {
  write_file(small_writer(), path_);
  auto r = GgufFile::open(path_);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_EQ(r->tensors().size(), 3u);
}

TEST_F(GgufBad, Magic) {
  expect_bad(
      small_writer(), [](Bytes& b) { b[0] = 'X'; }, ErrorCode::kInvalidFile, "bad magic");
}

TEST_F(GgufBad, EmptyFile) {
  write_bytes(path_, {});
  expect_open_error(path_, ErrorCode::kInvalidFile, "truncated");
}

TEST_F(GgufBad, VersionOne) {
  GgufWriter w = small_writer();
  w.set_version(1);
  expect_bad(w, ErrorCode::kUnsupported, "version 1");
}

TEST_F(GgufBad, ByteSwapped) {
  GgufWriter w = small_writer();
  w.set_version(0x03000000);
  expect_bad(w, ErrorCode::kUnsupported, "big-endian");
}

TEST_F(GgufBad, TruncatedAnywhere) {
  write_file(small_writer(), path_);
  Bytes full = read_bytes(path_);
  for (size_t len = 0; len < full.size(); ++len) {
    write_bytes(path_, Bytes(full.begin(), full.begin() + static_cast<ptrdiff_t>(len)));
    Result<GgufFile> r = GgufFile::open(path_);
    ASSERT_FALSE(r.ok()) << "prefix of " << len << " bytes opened";
    EXPECT_EQ(r.status().code(), ErrorCode::kInvalidFile) << len;
    EXPECT_THAT(r.status().message(), AnyOf(HasSubstr("truncated"), HasSubstr("too many"))) << len;
    if (HasFailure()) break;  // one report is enough
    EXPECT_THAT(r.status().message(), HasSubstr(path_));
  }
}

TEST_F(GgufBad, KeyLengthPastEof) {
  // The first key's length field is at offset 24.
  expect_bad(
      small_writer(), [](Bytes& b) { poke<uint64_t>(b, 24, 100000); }, ErrorCode::kInvalidFile,
      "runs past the end of the file");
}

TEST_F(GgufBad, KeyLengthAbsurd) {
  expect_bad(
      small_writer(), [](Bytes& b) { poke<uint64_t>(b, 24, uint64_t{1} << 40); }, ErrorCode::kInvalidFile,
      "absurd length");
}

TEST_F(GgufBad, StringValuePastEof) {
  expect_bad(
      small_writer(),
      [](Bytes& b) {
        size_t at = find_unique(b, "general.architecture") + 20 + 4;  // after key and type tag
        poke<uint64_t>(b, at, uint64_t{1} << 62);
      },
      ErrorCode::kInvalidFile, "string value of length 4611686018427387904");
}

TEST_F(GgufBad, ArrayLengthAbsurd) {
  expect_bad(
      small_writer(),
      [](Bytes& b) {
        size_t at = find_unique(b, "some.array") + 10 + 4 + 4;  // key, ARRAY tag, element tag
        poke<uint64_t>(b, at, uint64_t{1} << 62);
      },
      ErrorCode::kInvalidFile, "array of 4611686018427387904 UINT32 elements");
}

TEST_F(GgufBad, StringArrayLengthAbsurd) {
  expect_bad(
      small_writer(),
      [](Bytes& b) {
        size_t at = find_unique(b, "some.strings") + 12 + 4 + 4;
        poke<uint64_t>(b, at, uint64_t{1} << 40);
      },
      ErrorCode::kInvalidFile, "array of 1099511627776 strings");
}

TEST_F(GgufBad, TooManyTensors) {
  expect_bad(
      small_writer(), [](Bytes& b) { poke<uint64_t>(b, 8, 1000000); }, ErrorCode::kInvalidFile,
      "too many tensors");
}

TEST_F(GgufBad, TooManyKvs) {
  expect_bad(
      small_writer(), [](Bytes& b) { poke<uint64_t>(b, 16, uint64_t{1} << 50); }, ErrorCode::kInvalidFile,
      "too many key-value pairs");
}

TEST_F(GgufBad, DuplicateKey) {
  GgufWriter w = small_writer();
  w.add_raw_kv("gemma3.block_count", static_cast<uint32_t>(GgufType::kUint8), {1});
  expect_bad(w, ErrorCode::kInvalidFile, "duplicate key 'gemma3.block_count'");
}

TEST_F(GgufBad, EmptyKey) {
  GgufWriter w = small_writer();
  w.add_raw_kv("", static_cast<uint32_t>(GgufType::kUint8), {1});
  expect_bad(w, ErrorCode::kInvalidFile, "empty key");
}

TEST_F(GgufBad, KeyNotUtf8) {
  GgufWriter w = small_writer();
  w.set_u8("bad\xff.key", 1);
  expect_bad(w, ErrorCode::kInvalidFile, "is not valid UTF-8");
}

TEST_F(GgufBad, UnknownValueType) {
  GgufWriter w = small_writer();
  w.add_raw_kv("k.weird", 13, {0, 0, 0, 0});
  expect_bad(w, ErrorCode::kInvalidFile, "key 'k.weird': unknown value type tag 13");
}

TEST_F(GgufBad, BoolNotZeroOrOne) {
  GgufWriter w = small_writer();
  w.add_raw_kv("k.bool", static_cast<uint32_t>(GgufType::kBool), {2});
  expect_bad(w, ErrorCode::kInvalidFile, "key 'k.bool': BOOL value is 2");
}

TEST_F(GgufBad, NestedArray) {
  GgufWriter w = small_writer();
  Bytes payload = {9, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0};  // ARRAY of 1 ARRAY ...
  w.add_raw_kv("k.nested", static_cast<uint32_t>(GgufType::kArray), payload);
  expect_bad(w, ErrorCode::kUnsupported, "key 'k.nested': nested arrays are not supported");
}

TEST_F(GgufBad, AlignmentWrongType) {
  GgufWriter w = small_writer();
  w.set_u64("general.alignment", 32);
  expect_bad(w, ErrorCode::kInvalidFile, "'general.alignment' has type UINT64, expected UINT32");
}

TEST_F(GgufBad, AlignmentNotPowerOfTwo) {
  GgufWriter w = small_writer();
  w.set_u32("general.alignment", 48);
  expect_bad(w, ErrorCode::kInvalidFile, "'general.alignment' = 48 is not a power of two");
}

TEST_F(GgufBad, DuplicateTensorName) {
  GgufWriter w = small_writer();
  w.mutable_tensors()[2].name = "a.weight";
  expect_bad(w, ErrorCode::kInvalidFile, "duplicate tensor name 'a.weight'");
}

TEST_F(GgufBad, TensorNameNotUtf8) {
  GgufWriter w = small_writer();
  w.mutable_tensors()[1].name = "b\xc0\x80";  // overlong encoding of NUL
  expect_bad(w, ErrorCode::kInvalidFile, "is not valid UTF-8");
}

TEST_F(GgufBad, ZeroDims) {
  GgufWriter w = small_writer();
  w.mutable_tensors()[1].ne.clear();
  expect_bad(w, ErrorCode::kInvalidFile, "tensor 'b.weight': n_dims = 0");
}

TEST_F(GgufBad, FiveDims) {
  GgufWriter w = small_writer();
  w.mutable_tensors()[1].ne = {16, 1, 1, 1, 1};
  expect_bad(w, ErrorCode::kInvalidFile, "tensor 'b.weight': n_dims = 5");
}

TEST_F(GgufBad, NegativeNe) {
  GgufWriter w = small_writer();
  w.mutable_tensors()[0].ne[1] = static_cast<uint64_t>(-5);
  expect_bad(w, ErrorCode::kInvalidFile, "tensor 'a.weight': ne[1] = -5 is negative");
}

TEST_F(GgufBad, OverflowingNe) {
  GgufWriter w = small_writer();
  w.mutable_tensors()[2].ne = {8, uint64_t{1} << 40, uint64_t{1} << 40};
  expect_bad(w, ErrorCode::kInvalidFile, "tensor 'c.weight': element count overflows");
}

TEST_F(GgufBad, Ne0NotBlockMultiple) {
  GgufWriter w = small_writer();
  w.mutable_tensors()[0].ne = {33, 2};
  expect_bad(w, ErrorCode::kInvalidFile,
             "tensor 'a.weight': ne[0] = 33 is not a multiple of the Q8_0 block size 32");
}

TEST_F(GgufBad, UnsupportedTensorType) {
  GgufWriter w = small_writer();
  w.mutable_tensors()[0].ggml_type = 16;
  expect_bad(w, ErrorCode::kUnsupported, "tensor 'a.weight' has ggml type 16 (IQ2_XXS)");
}

TEST_F(GgufBad, UnknownTensorType) {
  GgufWriter w = small_writer();
  w.mutable_tensors()[0].ggml_type = 99;
  expect_bad(w, ErrorCode::kUnsupported, "tensor 'a.weight' has ggml type 99 (unknown type id)");
}

TEST_F(GgufBad, OffsetNotAligned) {
  GgufWriter w = small_writer();
  w.mutable_tensors()[1].offset += 8;
  expect_bad(w, ErrorCode::kInvalidFile,
             "tensor 'b.weight': offset 168 is not a multiple of the alignment 32");
}

TEST_F(GgufBad, TensorDataPastEof) {
  GgufWriter w = small_writer();
  w.mutable_tensors()[2].ne = {8, 2};  // header claims 64 bytes; only 32 are written
  expect_bad(w, ErrorCode::kInvalidFile, "tensor 'c.weight': data [192, +64)");
}

TEST_F(GgufBad, TensorDataPastEofAfterTruncation) {
  expect_bad(
      small_writer(), [](Bytes& b) { b.resize(b.size() - 1); }, ErrorCode::kInvalidFile,
      "runs past the end of the file");
}

TEST_F(GgufBad, OverlappingTensors) {
  GgufWriter w = small_writer();
  w.mutable_tensors()[2].offset = 128;  // inside a.weight's 136 bytes at [0, 136)
  expect_bad(w, ErrorCode::kInvalidFile,
             "tensors 'a.weight' (offset 0, 136 bytes) and 'c.weight' (offset 128) overlap");
}

TEST_F(GgufBad, RandomCorruptionNeverCrashes) {
  // Flipping header bytes must give either a valid file or an error, never a crash (run the
  // suite under -DGEMMA3_SANITIZE=ON to check for UB too).
  write_file(small_writer(), path_);
  Bytes full = read_bytes(path_);
  size_t header_end = find_unique(full, "c.weight") + 8 + 20;
  std::mt19937 rng(7);
  int ok = 0;
  const int kIters = 600;
  for (int iter = 0; iter < kIters; ++iter) {
    Bytes b = full;
    int flips = 1 + iter % 3;
    for (int k = 0; k < flips; ++k) b[rng() % header_end] ^= static_cast<uint8_t>(1u << (rng() % 8));
    write_bytes(path_, b);
    Result<GgufFile> r = GgufFile::open(path_);
    if (r.ok()) {
      ++ok;
      for (const TensorView& t : r->tensors()) {
        volatile uint8_t sink = t.nbytes ? static_cast<const uint8_t*>(t.data)[t.nbytes - 1] : 0;
        (void)sink;
      }
    } else {
      EXPECT_THAT(r.status().message(), HasSubstr(path_));
    }
  }
  EXPECT_LT(ok, kIters);
}

// ---- the real checkpoint ----------------------------------------------------------------------

std::string real_model_path() { return testutil::model_270m_path(); }

TEST(GgufRealModel, Gemma3_270M_Q4_K_M) {
  std::string path = real_model_path();
  if (path.empty() || !fs::exists(path)) {
    GTEST_SKIP() << "model file not found at '" << path << "' (set GEMMA3_MODEL_270M)";
  }
  auto start = std::chrono::steady_clock::now();
  auto r = GgufFile::open(path);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  auto tokens = r->get_string_array("tokenizer.ggml.tokens");
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(seconds, 1.0);
  ASSERT_TRUE(tokens.ok()) << tokens.status().to_string();
  EXPECT_EQ(tokens->size(), 262144u);

  EXPECT_EQ(r->get_string("general.architecture").value(), "gemma3");
  EXPECT_EQ(r->get_int("gemma3.block_count").value(), 18);
  EXPECT_EQ(r->get_int("gemma3.embedding_length").value(), 640);
  EXPECT_EQ(r->tensors().size(), 2u + 13u * 18u);
  const TensorView* emb = r->find_tensor("token_embd.weight");
  ASSERT_NE(emb, nullptr);
  EXPECT_EQ(emb->shape, (std::vector<int64_t>{262144, 640}));
  EXPECT_EQ(emb->dtype, DType::kQ8_0);  // docs/formats.md §3.7: Q4_K_M puts token_embd in Q8_0 for 270M
  int q4k = 0;
  for (const TensorView& t : r->tensors()) {
    // Every type must be one we dequantize (not F8, which GGUF cannot hold).
    EXPECT_NE(t.dtype, DType::kF8E4M3) << t.name;
    EXPECT_EQ(row_bytes(t.dtype, t.cols()).value() * static_cast<uint64_t>(t.rows()), t.nbytes) << t.name;
    q4k += t.dtype == DType::kQ4_K;
    if (t.shape.size() == 1) EXPECT_EQ(t.dtype, DType::kF32) << t.name;  // norms stay F32
  }
  EXPECT_GT(q4k, 0);
  // Norm weights are stored +1 (docs/formats.md §2.8): the final norm's values should sit near 1... or at
  // least be finite.
  const TensorView* norm = r->find_tensor("output_norm.weight");
  ASSERT_NE(norm, nullptr);
  std::vector<float> w(norm->cols());
  dequantize_row(norm->dtype, norm->data, w.data(), norm->cols());
  for (float v : w) ASSERT_TRUE(std::isfinite(v));
  // A row of the Q8_0 embedding dequantizes to finite, not-all-zero values.
  std::vector<float> row(640);
  dequantize_row(emb->dtype, emb->row_ptr(2), row.data(), 640);
  float amax = 0;
  for (float v : row) {
    ASSERT_TRUE(std::isfinite(v));
    amax = std::max(amax, std::fabs(v));
  }
  EXPECT_GT(amax, 0.0f);
}

// Goldens from the Python reference: gguf-py 0.19.0, `gguf.quants.dequantize` on the same file
// (sha256 a5fd3b62...), row 1 (row 0 for 1-D) of one tensor per type in the file.
TEST(GgufRealModel, DequantizeMatchesGgufPy) {
  std::string path = real_model_path();
  if (path.empty() || !fs::exists(path)) {
    GTEST_SKIP() << "model file not found at '" << path << "' (set GEMMA3_MODEL_270M)";
  }
  struct Golden {
    const char* name;
    DType type;
    double sum, sumsq;
    float first[4];
    float at300;
  };
  const Golden goldens[] = {
      {"output_norm.weight", DType::kF32, 16861.6953, 1871095.03, {7.125f, 9.5625f, 47.0f, 145.0f}, 44.25f},
      {"token_embd.weight",
       DType::kQ8_0,
       0.810054779,
       1.06323637,
       {0.022817611694335938f, -0.06111860275268555f, -0.09208536148071289f, -0.0562291145324707f},
       0.018610000610351562f},
      {"blk.0.attn_q.weight",
       DType::kQ5_0,
       -0.409484863,
       0.50907186,
       {0.003387451171875f, -0.02032470703125f, -0.030487060546875f, -0.00677490234375f},
       0.04974365234375f},
      {"blk.0.attn_v.weight",
       DType::kQ8_0,
       1.46395588,
       1.2697674,
       {-0.002490997314453125f, -0.08344841003417969f, -0.028646469116210938f, -0.0099639892578125f},
       0.1396474838256836f},
      {"blk.0.ffn_down.weight",
       DType::kQ6_K,
       0.300540328,
       0.874175059,
       {-0.0033416748046875f, -0.00835418701171875f, -0.01336669921875f, 0.00501251220703125f},
       0.023667097091674805f},
      {"blk.2.ffn_down.weight",
       DType::kQ4_K,
       0.192177653,
       0.477110819,
       {-0.008316755294799805f, 0.01171576976776123f, -0.01632976531982422f, 0.02373528480529785f},
       -0.024614334106445312f},
  };
  auto r = GgufFile::open(path);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  for (const Golden& g : goldens) {
    SCOPED_TRACE(g.name);
    const TensorView* t = r->find_tensor(g.name);
    ASSERT_NE(t, nullptr);
    ASSERT_EQ(t->dtype, g.type);
    std::vector<float> row(t->cols());
    dequantize_row(t->dtype, t->row_ptr(t->rows() > 1 ? 1 : 0), row.data(), t->cols());
    double sum = 0, sumsq = 0;
    for (float v : row) {
      sum += v;
      sumsq += static_cast<double>(v) * v;
    }
    EXPECT_NEAR(sum, g.sum, 1e-6 * std::max(1.0, std::fabs(g.sum)) + 1e-6);
    EXPECT_NEAR(sumsq, g.sumsq, 1e-6 * g.sumsq);
    for (int i = 0; i < 4; ++i) EXPECT_NEAR(row[i], g.first[i], 1e-7f + 1e-6f * std::fabs(g.first[i])) << i;
    EXPECT_NEAR(row[300], g.at300, 1e-7f + 1e-6f * std::fabs(g.at300));
  }
}

}  // namespace
}  // namespace gemma3
