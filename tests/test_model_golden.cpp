// The engine against the independent reference: goldens written by transformers (fp32, eager
// attention) in tools/reference/make_goldens.py, listed in tests/data/goldens/manifest.json.
//
// Tolerance: both sides compute in fp32 with the same weights, so differences come only from
// summation order and libm (a few ulp per op, compounded over 8 layers and a 512-wide LM
// head). We require max |ours - ref| <= 1e-4 * max(1, max |ref|) for logits and per-layer
// hidden states; a real bug (wrong norm, rope, mask, scale) moves values by 1e-2 or more.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "checkpoint/weights.h"
#include "gemma3/gemma3.h"
#include "model/forward.h"
#include "runtime/kv_cache.h"
#include "test_util.h"

namespace gemma3 {
namespace {

const std::string kData = std::string(GEMMA3_SOURCE_DIR) + "/tests/data";

const nlohmann::json& manifest() {
  static const nlohmann::json m = [] {
    std::ifstream f(kData + "/goldens/manifest.json");
    return nlohmann::json::parse(f);
  }();
  return m;
}

const nlohmann::json& find_case(const std::string& name) {
  for (const auto& c : manifest()["cases"])
    if (c["name"] == name) return c;
  throw std::runtime_error("no golden case " + name);
}

std::vector<float> read_array(const nlohmann::json& c, const std::string& key) {
  const auto& a = c["arrays"][key];
  std::ifstream f(kData + "/goldens/" + a["file"].get<std::string>(), std::ios::binary);
  size_t n = 1;
  for (int64_t d : a["shape"]) n *= d;
  std::vector<float> v(n);
  f.read(reinterpret_cast<char*>(v.data()), n * sizeof(float));
  EXPECT_EQ(static_cast<size_t>(f.gcount()), n * sizeof(float)) << a["file"];
  return v;
}

// The default (fast) CPU path quantizes decode activations (matmuls of < 16 tokens, and the LM
// head of the last token) to int8 blocks of 32, as llama.cpp does: each dot is off by up to
// ~2^-8 / sqrt(k / 32) of sum |w x|, compounded over 18 layers and maximized over 262144
// logits. Measured on the 270M: max rel logit error 3.4e-2 to 4.5e-2 (france prompt, all
// decode; it moves with 1-ulp fp32 changes that flip an activation's int8 rounding) and 1.0e-2
// (chat prompt, LM head only); decode vs prefill of the same tokens 4.8e-2. The bound below
// leaves ~2x of margin; the greedy tokens and top-1 checks stay exact.
// GEMMA3_CPU_KERNELS=ref (the fp32 reference) keeps the tight bounds.
bool int8_decode() {
  const char* e = std::getenv("GEMMA3_CPU_KERNELS");
  return !(e && (std::string(e) == "ref" || std::string(e) == "reference"));
}

// max |a - b| relative to max(1, max |b|)
double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double err = 0, mag = 1;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    err = std::max(err, std::abs(double(a[i]) - b[i]));
    mag = std::max(mag, std::abs(double(b[i])));
  }
  return err / mag;
}

std::string model_path(const std::string& model) {
  if (model == "tiny") return kData + "/tiny";
  if (model == "tiny-f32") return kData + "/tiny-f32.gguf";
  if (model == "tiny-q8_0") return kData + "/tiny-q8_0.gguf";
  return "";
}

std::shared_ptr<Model> load(const std::string& path, int chunk, int context = 64) {
  LoadOptions o;
  o.backend = BackendKind::kCpu;
  o.threads = 2;
  o.kv_type = KvType::kF32;
  o.prefill_chunk = chunk;
  o.context = context;
  auto m = Model::load(path, o);
  EXPECT_TRUE(m.ok()) << m.status().to_string();
  return m.ok() ? *m : nullptr;
}

std::vector<int32_t> tokens_of(const nlohmann::json& c) { return c["tokens"].get<std::vector<int32_t>>(); }

struct TinyCase {
  std::string golden;  // case name in the manifest
  std::string model;   // which file to load (HF folder or one of the GGUF conversions)
  int chunk;           // prefill chunk: < window, = window, > prompt
};

class TinyGolden : public ::testing::TestWithParam<TinyCase> {};

// Prefill in chunks: logits at every position and the hidden state after every layer.
TEST_P(TinyGolden, PrefillMatchesTransformers) {
  const TinyCase& p = GetParam();
  const auto& c = find_case(p.golden);
  auto model = load(model_path(p.model), p.chunk);
  ASSERT_TRUE(model);
  auto session = std::move(model->new_session().value());
  const auto tokens = tokens_of(c);
  const int T = static_cast<int>(tokens.size());
  const int64_t H = c["arrays"]["layer_out"]["shape"][2];
  const int L = c["arrays"]["layer_out"]["shape"][0];
  // Hook: layer_out arrives per chunk as [n, H]; place it at [layer, pos, :].
  std::vector<float> layer_out(size_t(L) * T * H);
  int chunk_pos = 0;
  session->set_activation_hook([&](int layer, const std::string& name, const float* d, int64_t n) {
    if (name == "embed" && layer == -1) chunk_pos = -1;
    if (name != "layer_out") return;
    if (layer == 0) chunk_pos = chunk_pos < 0 ? session->position() : chunk_pos;
    std::copy(d, d + n, layer_out.begin() + (size_t(layer) * T + chunk_pos) * H);
  });
  session->keep_all_logits(true);
  ASSERT_TRUE(session->feed_tokens(tokens).ok());
  const double e_logits = rel_err(testutil::to_vector(session->all_logits()), read_array(c, "logits"));
  const double e_layers = rel_err(layer_out, read_array(c, "layer_out"));
  // A quantized model's chunks under 16 tokens run int8 decode (int8_decode(); tiny-q8_0 at
  // chunk 5 measured 3.5e-2 / 3.9e-2: its rows are 2 blocks of 32, so no averaging).
  const double tol = p.model == "tiny-q8_0" && int8_decode() ? 1e-1 : 1e-4;
  EXPECT_LT(e_logits, tol) << p.golden << " on " << p.model;
  EXPECT_LT(e_layers, tol) << p.golden << " on " << p.model;
  std::printf("  %s on %s, chunk %d: max rel error logits %.2e, layer outputs %.2e\n", p.golden.c_str(),
              p.model.c_str(), p.chunk, e_logits, e_layers);
}

// One token at a time (the decode path) past the window and through several ring wraps.
TEST_P(TinyGolden, DecodeStepsMatchTransformers) {
  const TinyCase& p = GetParam();
  const auto& c = find_case(p.golden);
  auto model = load(model_path(p.model), p.chunk);
  ASSERT_TRUE(model);
  auto session = std::move(model->new_session().value());
  const auto tokens = tokens_of(c);
  const auto ref = read_array(c, "logits");
  const int64_t V = model->vocab_size();
  std::vector<float> ours;
  for (int32_t t : tokens) {
    ASSERT_TRUE(session->feed_tokens({t}).ok());
    ours.insert(ours.end(), session->last_logits().begin(), session->last_logits().end());
  }
  ASSERT_EQ(ours.size(), tokens.size() * V);
  EXPECT_LT(rel_err(ours, ref), p.model == "tiny-q8_0" && int8_decode() ? 1e-1 : 1e-4);  // see Prefill
}

INSTANTIATE_TEST_SUITE_P(Tiny, TinyGolden,
                         ::testing::Values(TinyCase{"tiny_long", "tiny", 5}, TinyCase{"tiny_long", "tiny", 8},
                                           TinyCase{"tiny_long", "tiny", 64},
                                           TinyCase{"tiny_text", "tiny", 7},
                                           TinyCase{"tiny_long", "tiny-f32", 5},
                                           TinyCase{"tiny_long_q8_0", "tiny-q8_0", 5}),
                         [](const auto& info) {
                           std::string s = info.param.golden + "_" + info.param.model + "_chunk" +
                                           std::to_string(info.param.chunk);
                           for (char& ch : s)
                             if (!isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return s;
                         });

// RoPE at large positions (past 32K and past 100K): a short sequence starting at an offset,
// run through the decoder directly (the public session always starts at 0).
TEST(TinyGoldenOffset, RopeAtLargePositionsMatchesTransformers) {
  for (const char* name : {"tiny_offset_40000", "tiny_offset_100000"}) {
    const auto& c = find_case(name);
    auto ckpt = Checkpoint::open(kData + "/tiny");
    ASSERT_TRUE(ckpt.ok()) << ckpt.status().to_string();
    const ModelConfig& cfg = (*ckpt)->config();
    auto be = std::move(make_cpu_backend({2}).value());
    auto w = BackendModel::upload(*be, (*ckpt)->weights());
    ASSERT_TRUE(w.ok());
    KvCache cache(*be, plan_kv(cfg, 64, 16, DType::kF32));
    ASSERT_TRUE(cache.allocate(cfg).ok());
    ForwardScratch scratch(*be);
    ASSERT_TRUE(scratch.allocate(cfg, 16).ok());
    const auto tokens = tokens_of(c);
    const int pos0 = c["positions"][0];
    std::vector<float> logits(tokens.size() * cfg.vocab_size);
    ForwardRequest req;
    req.ids = tokens.data();
    req.n = static_cast<int>(tokens.size());
    req.pos0 = pos0;
    req.kv_start = pos0;
    req.all_logits = true;
    ASSERT_TRUE(forward(cfg, *w, *be, cache.view(), scratch, req, logits.data(), nullptr).ok());
    // Both sides compute angles as float(pos) * inv_freq in fp32, so even at 1e5 they agree.
    const double e = rel_err(logits, read_array(c, "logits"));
    EXPECT_LT(e, 1e-4) << name;
    std::printf("  %s: max rel error %.2e\n", name, e);
  }
}

// ---- the real Gemma 3 270M (Q4_K_M GGUF), fetched by models/fetch.sh ----

std::string real_model_path() { return testutil::model_270m_path(); }

class Real270m : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!std::ifstream(real_model_path()).good()) return;
    LoadOptions o;
    o.backend = BackendKind::kCpu;
    o.kv_type = KvType::kF32;
    o.context = 256;
    auto m = Model::load(real_model_path(), o);
    if (m.ok())
      model_ = *m;
    else
      load_error_ = m.status().to_string();
  }
  static void TearDownTestSuite() { model_.reset(); }
  void SetUp() override {
    if (!model_ && load_error_.empty())
      GTEST_SKIP() << "the 270M model is not at " << real_model_path() << " (run models/fetch.sh)";
    ASSERT_TRUE(model_) << load_error_;
  }
  static std::shared_ptr<Model> model_;
  static std::string load_error_;
};
std::shared_ptr<Model> Real270m::model_;
std::string Real270m::load_error_;

TEST_F(Real270m, LastLogitsAndGreedyContinuationMatchTransformers) {
  for (const char* name : {"real270m_france", "real270m_chat"}) {
    const auto& c = find_case(name);
    auto session = std::move(model_->new_session().value());
    ASSERT_TRUE(session->feed_tokens(tokens_of(c)).ok());
    // The reference ran the same dequantized weights in fp32; the LM head sums 640 products.
    const double e = rel_err(testutil::to_vector(session->last_logits()), read_array(c, "last_logits"));
    EXPECT_LT(e, int8_decode() ? 1e-1 : 1e-3) << name;
    std::printf("  %s: last-position logits max rel error %.2e\n", name, e);
    // Greedy continuation, token for token.
    std::vector<int32_t> ids;
    GenerateOptions g;
    g.max_tokens = static_cast<int>(c["greedy_ids"].size());
    ASSERT_TRUE(session
                    ->generate(g,
                               [&](const TokenEvent& ev) {
                                 if (ev.id >= 0) ids.push_back(ev.id);
                                 return true;
                               })
                    .ok());
    const auto want = c["greedy_ids"].get<std::vector<int32_t>>();
    const auto margins = c["greedy_margins"].get<std::vector<double>>();
    // Compare up to the first near-tie (top-2 logit gap < 0.05 in the reference: the France
    // prompt has 0.013 at step 11, the chat prompt 0.003 at step 8), where rounding may pick
    // either token, or a stop id (which ends generation without an event).
    std::vector<int32_t> want_prefix;
    for (size_t i = 0; i < want.size() && margins[i] >= 0.05 && want[i] != 1 && want[i] != 106; ++i)
      want_prefix.push_back(want[i]);
    ASSERT_GE(ids.size(), want_prefix.size()) << name;
    ids.resize(want_prefix.size());
    EXPECT_EQ(ids, want_prefix) << name;
  }
}

}  // namespace
}  // namespace gemma3

namespace gemma3 {
namespace {

std::string greedy(Session& s, int n) {
  std::string out;
  GenerateOptions g;
  g.max_tokens = n;
  Status st = s.generate(g, [&](const TokenEvent& e) {
                 out += e.text;
                 return true;
               }).status();
  EXPECT_TRUE(st.ok()) << st.to_string();
  return out;
}

// The base 270M's greedy continuation of "The capital of France is" is " the capital of the
// country of France. ..." — identical in transformers (real270m_france golden), no "Paris"
// within 48 tokens. A question/answer framing gets the fact out of it.
TEST_F(Real270m, GreedyAnswerNamesParis) {
  auto session = std::move(model_->new_session().value());
  ASSERT_TRUE(session->feed_text("Question: What is the capital of France?\nAnswer:").ok());
  EXPECT_NE(greedy(*session, 4).find("Paris"), std::string::npos);
}

// A multi-turn chat keeps its context: turn 2 fed on top of turn 1's cache gives the same
// logits as a fresh session fed the whole conversation, and the answer can use turn 1.
TEST_F(Real270m, ChatTurnsKeepTheirContext) {
  auto chat = std::move(model_->new_session().value());
  ASSERT_TRUE(chat->feed_chat({{"user", "My name is Ada."}}).ok());
  const std::string reply = greedy(*chat, 12);
  ASSERT_TRUE(chat->feed_chat({{"user", "What is my name?"}}).ok());
  const std::vector<float> incremental = testutil::to_vector(chat->last_logits());

  auto fresh = std::move(model_->new_session().value());
  ASSERT_TRUE(
      fresh->feed_chat({{"user", "My name is Ada."}, {"model", reply}, {"user", "What is my name?"}}).ok());
  EXPECT_EQ(fresh->position(), chat->position());
  // Turn 2 alone runs through decode (int8 activations), the fresh session through prefill.
  EXPECT_LT(rel_err(incremental, testutil::to_vector(fresh->last_logits())), int8_decode() ? 1e-1 : 1e-4);
  const auto top = [](const std::vector<float>& v) {
    return std::max_element(v.begin(), v.end()) - v.begin();
  };
  EXPECT_EQ(top(incremental), top(testutil::to_vector(fresh->last_logits())));
  const std::string answer = greedy(*chat, 16);
  std::printf("  turn 1 reply: %s\n  turn 2 answer: %s\n", reply.c_str(), answer.c_str());
}

}  // namespace
}  // namespace gemma3
