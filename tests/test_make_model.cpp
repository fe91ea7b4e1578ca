// make-model: the generated checkpoints load through the normal paths (Checkpoint, Model) in
// every type, run to finite, non-degenerate logits, follow the GGUF conventions of docs/formats.md
// (types per tensor, metadata, vocabulary), and the fp8 folder holds the same model as the bf16
// GGUF of the same seed.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "checkpoint/gguf.h"
#include "checkpoint/weights.h"
#include "core/dtype.h"
#include "dev/make_model.h"
#include "gemma3/gemma3.h"
#include "loader_test_util.h"
#include "test_util.h"
#include "text/tokenizer_gguf.h"

namespace gemma3 {
namespace {

namespace fs = std::filesystem;

std::string make(const std::string& dir, const std::string& name, MakeModelOptions o) {
  const std::string p = dir + "/" + name;
  Status s = make_model(o, p, nullptr);
  EXPECT_TRUE(s.ok()) << s.to_string();
  return p;
}

// Last-position logits of a short prompt.
std::vector<float> logits_of(const std::string& path) {
  LoadOptions lo;
  lo.backend = BackendKind::kCpu;
  lo.threads = 2;
  lo.kv_type = KvType::kF32;
  lo.context = 64;
  auto m = Model::load(path, lo);
  EXPECT_TRUE(m.ok()) << path << ": " << m.status().to_string();
  if (!m.ok()) return {};
  auto s = (*m)->new_session();
  EXPECT_TRUE(s.ok());
  // <bos>, <start_of_turn>, a few fillers, "\n", a byte piece; 12 tokens cross the tiny window of 8.
  Status st = (*s)->feed_tokens({2, 105, 370, 371, 400, 107, 200, 380, 390, 107, 106, 375});
  EXPECT_TRUE(st.ok()) << st.to_string();
  return testutil::to_vector((*s)->last_logits());
}

void expect_healthy(const std::vector<float>& l, const std::string& what) {
  ASSERT_FALSE(l.empty()) << what;
  float lo = l[0], hi = l[0];
  for (float x : l) {
    ASSERT_TRUE(std::isfinite(x)) << what;
    lo = std::min(lo, x), hi = std::max(hi, x);
  }
  EXPECT_GT(hi - lo, 0.5f) << what << ": logits nearly constant";
}

// max |a - b| / max |b|, and the Pearson correlation.
std::pair<double, double> compare(const std::vector<float>& a, const std::vector<float>& b) {
  double err = 0, mag = 0, sa = 0, sb = 0, saa = 0, sbb = 0, sab = 0;
  const size_t n = std::min(a.size(), b.size());
  for (size_t i = 0; i < n; ++i) {
    err = std::max(err, std::abs(double(a[i]) - b[i]));
    mag = std::max(mag, std::abs(double(b[i])));
    sa += a[i], sb += b[i], saa += double(a[i]) * a[i], sbb += double(b[i]) * b[i],
        sab += double(a[i]) * b[i];
  }
  const double cov = sab / n - sa / n * sb / n;
  const double corr = cov / std::sqrt((saa / n - sa / n * sa / n) * (sbb / n - sb / n * sb / n));
  return {err / mag, corr};
}

class MakeModel : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { dir_ = new std::string(testutil::temp_dir("make_model")); }
  static void TearDownTestSuite() {
    fs::remove_all(*dir_);
    delete dir_;
  }
  static std::string* dir_;
};
std::string* MakeModel::dir_ = nullptr;

// Hand-computed e4m3fn codes (docs/formats.md §5.1: bias 7, 3 mantissa bits, max 448, no inf).
TEST(MakeModelFp8, EncoderGoldens) {
  EXPECT_EQ(f32_to_f8e4m3(0.0f), 0x00);
  EXPECT_EQ(f32_to_f8e4m3(-0.0f), 0x80);
  EXPECT_EQ(f32_to_f8e4m3(1.0f), 0x38);     // e = 7, m = 0
  EXPECT_EQ(f32_to_f8e4m3(1.0625f), 0x38);  // halfway 1 / 1.125: ties to even (m = 0)
  EXPECT_EQ(f32_to_f8e4m3(1.1875f), 0x3A);  // halfway 1.125 / 1.25: ties to even (m = 2)
  EXPECT_EQ(f32_to_f8e4m3(-2.5f), 0xC2);    // -1.25 * 2^1: s 1, e 1000, m 010
  EXPECT_EQ(f32_to_f8e4m3(448.0f), 0x7E);   // max finite
  EXPECT_EQ(f32_to_f8e4m3(1000.0f), 0x7E);  // saturates
  EXPECT_EQ(f32_to_f8e4m3(-1e9f), 0xFE);
  EXPECT_EQ(f32_to_f8e4m3(0.001953125f), 0x01);   // 2^-9, smallest subnormal
  EXPECT_EQ(f32_to_f8e4m3(0.0009765625f), 0x00);  // 2^-10: halfway to 0, ties to even
  EXPECT_EQ(f32_to_f8e4m3(0.0146484375f), 0x08);  // 7.5 * 2^-9: rounds up to the smallest normal 2^-6
  // Every finite code survives decode -> encode.
  for (int c = 0; c < 256; ++c) {
    if ((c & 0x7F) == 0x7F) continue;  // NaN
    EXPECT_EQ(f32_to_f8e4m3(f8e4m3_to_f32(static_cast<uint8_t>(c))), c) << c;
  }
}

TEST(MakeModelVocab, SpecialIdsAndTokenizer) {
  SynthVocab v = make_synth_vocab(262144, true);
  ASSERT_EQ(v.pieces.size(), 262144u);
  EXPECT_EQ(v.pieces[0], "<pad>");
  EXPECT_EQ(v.pieces[1], "<eos>");
  EXPECT_EQ(v.pieces[2], "<bos>");
  EXPECT_EQ(v.pieces[3], "<unk>");
  EXPECT_EQ(v.pieces[105], "<start_of_turn>");
  EXPECT_EQ(v.pieces[106], "<end_of_turn>");
  EXPECT_EQ(v.pieces[107], "\n");
  EXPECT_EQ(v.pieces[108], "<0x00>");
  EXPECT_EQ(v.pieces[108 + 255], "<0xFF>");
  EXPECT_EQ(v.pieces[255999], "<start_of_image>");
  EXPECT_EQ(v.pieces[256000], "<end_of_image>");
  std::set<std::string> unique(v.pieces.begin(), v.pieces.end());
  EXPECT_EQ(unique.size(), v.pieces.size());
  // Fillers are NORMAL with strictly decreasing scores.
  float prev = 1e30f;
  for (size_t i = 364; i < v.pieces.size(); ++i) {
    if (i == 255999 || i == 256000) continue;
    ASSERT_EQ(v.types[i], 1) << i;
    ASSERT_LT(v.scores[i], prev) << i;
    prev = v.scores[i];
  }
}

TEST_F(MakeModel, GgufVocabularyLoadsThroughTokenizerFromGguf) {
  MakeModelOptions o;
  o.size = "tiny";
  o.vocab = 262144;
  o.type = DType::kQ8_0;
  o.layers = 1;
  const std::string p = make(*dir_, "vocab.gguf", o);
  auto f = GgufFile::open(p);
  ASSERT_TRUE(f.ok()) << f.status().to_string();
  auto tok = tokenizer_from_gguf(*f);
  ASSERT_TRUE(tok.ok()) << tok.status().to_string();
  EXPECT_EQ(tok->n_vocab(), 262144);
  EXPECT_EQ(tok->bos_id(), 2);
  EXPECT_EQ(tok->eos_id(), 1);
  EXPECT_EQ(tok->start_of_turn_id(), 105);
  EXPECT_EQ(tok->end_of_turn_id(), 106);
  EXPECT_EQ(tok->type(3), PieceType::kUnknown);
  auto ids = tok->encode("ab\n\xC3\xA9");  // "é" is not a piece: byte fallback <0xC3> <0xA9>
  ASSERT_TRUE(ids.ok());
  ASSERT_EQ(ids->size(), 4u);
  EXPECT_EQ((*ids)[1], 107);
  EXPECT_EQ((*ids)[2], 108 + 0xC3);
  EXPECT_EQ((*ids)[3], 108 + 0xA9);
  EXPECT_EQ(tok->decode(*ids), "ab\n\xC3\xA9");
  auto special = tok->encode("<start_of_turn>user", /*parse_special=*/true);
  ASSERT_TRUE(special.ok());
  EXPECT_EQ((*special)[0], 105);
}

TEST_F(MakeModel, EveryTypeLoadsAndRunsToFiniteLogits) {
  struct Case {
    const char* name;
    DType type;
    int hidden, intermediate;  // 256-multiples so Q4_K/Q6_K are exercised, not only the fallback
  };
  for (const Case& k : {Case{"f32", DType::kF32, 0, 0}, Case{"bf16", DType::kBF16, 0, 0},
                        Case{"f16", DType::kF16, 0, 0}, Case{"q8_0", DType::kQ8_0, 0, 0},
                        Case{"q4_0", DType::kQ4_0, 0, 0}, Case{"q4_k", DType::kQ4_K, 256, 512},
                        Case{"q4_k_fallback", DType::kQ4_K, 0, 0}, Case{"fp8", DType::kF8E4M3, 0, 0}}) {
    MakeModelOptions o;
    o.size = "tiny";
    o.type = k.type;
    o.hidden = k.hidden;
    o.intermediate = k.intermediate;
    o.seed = 3;
    const std::string p =
        make(*dir_, std::string("every_") + k.name + (k.type == DType::kF8E4M3 ? "" : ".gguf"), o);
    auto c = Checkpoint::open(p);
    ASSERT_TRUE(c.ok()) << k.name << ": " << c.status().to_string();
    expect_healthy(logits_of(p), k.name);
  }
}

TEST_F(MakeModel, TensorTypesFollowTheRecipes) {
  auto types_of = [&](const std::string& p) {
    std::map<std::string, DType> t;
    auto f = GgufFile::open(p);
    EXPECT_TRUE(f.ok()) << f.status().to_string();
    if (f.ok())
      for (const TensorView& v : f->tensors()) t[v.name] = v.dtype;
    return t;
  };
  MakeModelOptions o;
  o.size = "4b";  // 4B metadata, shrunk: 8 layers of width 256 (K-quant friendly)
  o.layers = 8, o.hidden = 256, o.intermediate = 512, o.heads = 2, o.kv_heads = 1, o.head_dim = 128,
  o.vocab = 1024;
  o.type = DType::kQ4_K;
  auto t = types_of(make(*dir_, "recipe_q4k.gguf", o));
  EXPECT_EQ(t["token_embd.weight"], DType::kQ6_K);
  EXPECT_EQ(t["output_norm.weight"], DType::kF32);
  EXPECT_EQ(t["blk.0.attn_v.weight"], DType::kQ6_K);    // use_more_bits(0, 8)
  EXPECT_EQ(t["blk.2.attn_v.weight"], DType::kQ4_K);    // (2 - 1) % 3 != 2
  EXPECT_EQ(t["blk.3.ffn_down.weight"], DType::kQ6_K);  // (3 - 1) % 3 == 2
  EXPECT_EQ(t["blk.7.ffn_down.weight"], DType::kQ6_K);  // i >= 7n/8
  EXPECT_EQ(t["blk.2.attn_q.weight"], DType::kQ4_K);
  EXPECT_EQ(t["blk.2.attn_q_norm.weight"], DType::kF32);
  auto f = GgufFile::open(dir_->c_str() + std::string("/recipe_q4k.gguf"));
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(*f->get_string("gemma3.rope.scaling.type"), "linear");
  EXPECT_EQ(*f->get_float("gemma3.rope.scaling.factor"), 8.0);
  EXPECT_EQ(*f->get_int("gemma3.attention.sliding_window"), 1024);
  EXPECT_EQ(*f->get_int("gemma3.context_length"), 131072);
  EXPECT_EQ(*f->get_int("general.file_type"), 15);

  o.type = DType::kQ4_0;
  t = types_of(make(*dir_, "recipe_q4_0.gguf", o));
  EXPECT_EQ(t["token_embd.weight"], DType::kF16);  // like Google's QAT Q4_0 files
  EXPECT_EQ(t["blk.0.ffn_up.weight"], DType::kQ4_0);

  // 270M-like widths (H = 640): K-quants fall back to Q8_0 where rows are not 256-divisible.
  o = MakeModelOptions{};
  o.size = "270m";
  o.layers = 2, o.vocab = 1024, o.type = DType::kQ4_K;
  t = types_of(make(*dir_, "recipe_270m.gguf", o));
  EXPECT_EQ(t["token_embd.weight"], DType::kQ8_0);
  EXPECT_EQ(t["blk.0.attn_q.weight"], DType::kQ8_0);       // 640 columns
  EXPECT_EQ(t["blk.1.attn_output.weight"], DType::kQ4_K);  // 1024 columns (4 x 256)
  EXPECT_EQ(t["blk.0.ffn_down.weight"], DType::kQ4_K);     // 2048 columns; use_more_bits(0, 2) is false
  EXPECT_EQ(t["blk.1.ffn_down.weight"], DType::kQ6_K);     // use_more_bits(1, 2): i >= 7n/8
}

TEST_F(MakeModel, SameSeedSameBytesOtherSeedOtherBytes) {
  MakeModelOptions o;
  o.size = "tiny";
  o.type = DType::kQ8_0;
  o.seed = 11;
  auto read = [](const std::string& p) {
    std::ifstream in(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  const std::string a = read(make(*dir_, "seed_a.gguf", o));
  const std::string b = read(make(*dir_, "seed_b.gguf", o));
  o.seed = 12;
  const std::string c = read(make(*dir_, "seed_c.gguf", o));
  EXPECT_EQ(a, b);
  ASSERT_EQ(a.size(), c.size());
  EXPECT_NE(a, c);
}

// The fp8 folder and the bf16 GGUF of one seed hold the same model. Per-row fp8 with 3 mantissa
// bits has a relative rounding error of up to 1/16 per weight (RMS about 3.6%); after 8 layers
// the logits stay strongly correlated but differ by several percent. bf16 vs f32 (2^-9
// rounding) must be an order of magnitude closer, and another seed must be uncorrelated.
TEST_F(MakeModel, Fp8FolderMatchesBf16Gguf) {
  MakeModelOptions o;
  o.size = "tiny";
  o.seed = 5;
  o.type = DType::kBF16;
  const auto bf16 = logits_of(make(*dir_, "same_bf16.gguf", o));
  o.type = DType::kF32;
  const auto f32 = logits_of(make(*dir_, "same_f32.gguf", o));
  o.type = DType::kF8E4M3;
  const auto fp8 = logits_of(make(*dir_, "same_fp8", o));
  o.seed = 6;
  o.type = DType::kBF16;
  const auto other = logits_of(make(*dir_, "other_bf16.gguf", o));
  ASSERT_EQ(fp8.size(), bf16.size());
  const auto [err_fp8, corr_fp8] = compare(fp8, bf16);
  const auto [err_bf16, corr_bf16] = compare(bf16, f32);
  const auto [err_other, corr_other] = compare(other, bf16);
  RecordProperty("fp8_rel_err", std::to_string(err_fp8));
  EXPECT_LT(err_fp8, 0.25) << "corr " << corr_fp8;
  EXPECT_GT(corr_fp8, 0.97);
  EXPECT_LT(err_bf16, 0.03) << "corr " << corr_bf16;
  EXPECT_GT(corr_bf16, 0.999);
  EXPECT_LT(corr_other, 0.5);
  EXPECT_GT(err_other, 0.3);
}

// Over max_shard_bytes the fp8 folder is sharded (model-0000k-of-0000n + index) and loads the same.
TEST_F(MakeModel, Fp8FolderShards) {
  MakeModelOptions o;
  o.size = "tiny";
  o.seed = 8;
  o.type = DType::kF8E4M3;
  const auto whole = logits_of(make(*dir_, "fp8_whole", o));
  o.max_shard_bytes = 200 << 10;
  const std::string d = make(*dir_, "fp8_sharded", o);
  EXPECT_FALSE(fs::exists(d + "/model.safetensors"));
  EXPECT_TRUE(fs::exists(d + "/model.safetensors.index.json"));
  int shards = 0;  // about 1 MB of tensors in 200 KB shards
  for (const auto& e : fs::directory_iterator(d))
    shards += e.path().filename().string().starts_with("model-0000");
  EXPECT_GE(shards, 4);
  EXPECT_TRUE(fs::exists(d + fmt::format("/model-00001-of-{:05}.safetensors", shards)));
  EXPECT_EQ(logits_of(d), whole);
}

// A full-size 270M (18 layers, H 640, 262144-token vocabulary): generate, load, run.
TEST_F(MakeModel, Real270mShapeRuns) {
  MakeModelOptions o;
  o.size = "270m";
  o.type = DType::kQ4_K;
  const std::string p = make(*dir_, "g270m.gguf", o);
  auto c = Checkpoint::open(p);
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  EXPECT_EQ((*c)->config().size_label, "270M");
  EXPECT_EQ((*c)->config().vocab_size, 262144);
  EXPECT_EQ((*c)->text_tensors().size(), 2u + 13u * 18u);
  c->reset();
  expect_healthy(logits_of(p), "270m");
  fs::remove(p);
}

}  // namespace
}  // namespace gemma3

namespace gemma3 {
namespace {

// The CLI front end: flags, exit codes (docs/cli.md: 0 ok, 2 usage), output that loads.
int run_cli(const std::string& args) {
  const int rc =
      std::system((std::string(GEMMA3_CLI_PATH) + " make-model " + args + " >/dev/null 2>&1").c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

TEST(MakeModelCli, WritesLoadableFilesAndRejectsBadFlags) {
  if (!fs::exists(GEMMA3_CLI_PATH)) GTEST_SKIP() << "CLI not built at " << GEMMA3_CLI_PATH;
  const std::string d = testutil::temp_dir("make_model_cli");
  EXPECT_EQ(run_cli("--size tiny --type q4_0 --vision --seed 4 -o " + d + "/t.gguf"), 0);
  auto c = Checkpoint::open(d + "/t.gguf");
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  EXPECT_TRUE((*c)->attach_vision(d + "/t.mmproj.gguf").ok());
  EXPECT_EQ(run_cli("--size tiny --type fp8 --layers 3 -o " + d + "/hf"), 0);
  auto h = Checkpoint::open(d + "/hf");
  ASSERT_TRUE(h.ok()) << h.status().to_string();
  EXPECT_EQ((*h)->config().n_layers, 3);
  EXPECT_EQ(run_cli("--size tiny --type q4_0"), 2);                   // no -o
  EXPECT_EQ(run_cli("--size 3b -o " + d + "/x.gguf"), 2);             // unknown size
  EXPECT_EQ(run_cli("--size 270m --vision -o " + d + "/x.gguf"), 2);  // 270M has no vision tower
  EXPECT_EQ(run_cli("--size tiny --heads 4 --kv-heads 3 -o " + d + "/x.gguf"), 2);
  EXPECT_EQ(run_cli("--size tiny --vocab 100 -o " + d + "/x.gguf"), 2);
  EXPECT_FALSE(fs::exists(d + "/x.gguf"));
  fs::remove_all(d);
}

}  // namespace
}  // namespace gemma3
