// The vision path against transformers (tools/reference/make_vision_goldens.py, fp32, eager):
// the SigLIP tower and projector outputs, and the logits of prompts with one and two images
// (JAX-style explicit image ids, HF's bidirectional image groups), through the HF folder and
// through the llama.cpp-style text GGUF + mmproj GGUF of the same weights. Also: the groups
// matter (causal-only logits equal HF's causal fallback and differ from the bidirectional
// ones), the session's image cache, chat with images, and the errors.
//
// Tolerances. Everything is fp32 with bf16-exact weights on both sides; the differences are
// summation order (our dot products, softmax, LayerNorm vs torch's) plus libm tanh/exp. Over 2
// vision layers and 6 text layers these stay near 1e-6 relative to the values' scale; we allow
// 2e-5 x max|golden| (tower/projector, O(1) values) and 1e-4 absolute for logits of magnitude
// ~3-10, which still catches any mask or layout mistake (those move logits by 1e-2 to 1).
// Measured (2026-11-27, x86-64, both CPU backends): tower/projector <= 5.4e-7 relative, logits
// <= 4.1e-6 absolute, end to end from the PNG 1.7e-6 (recorded as test properties).
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"
#include "checkpoint/weights.h"
#include "gemma3/gemma3.h"
#include "model/forward.h"
#include "model/vision.h"
#include "runtime/kv_cache.h"
#include "test_util.h"

namespace gemma3 {
namespace {

namespace fs = std::filesystem;
const std::string kData = std::string(GEMMA3_SOURCE_DIR) + "/tests/data";
const std::string kDir = kData + "/tiny-vision";

struct Goldens {
  nlohmann::json manifest;
  std::vector<float> load(const std::string& name) const {
    const auto& t = manifest["tensors"][name];
    const std::string path = kDir + "/" + t["file"].get<std::string>();
    std::ifstream in(path, std::ios::binary);
    std::vector<float> v(fs::file_size(path) / 4);
    in.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(v.size() * 4));
    return v;
  }
  std::vector<int32_t> ids(const std::string& prompt) const {
    return manifest["prompts"][prompt]["ids"].get<std::vector<int32_t>>();
  }
  int image_token() const { return manifest["image_token"].get<int>(); }
};

const Goldens* goldens() {
  static Goldens* g = [] {
    auto* g = new Goldens;
    std::ifstream in(kDir + "/goldens.json");
    if (in) g->manifest = nlohmann::json::parse(in);
    return g;
  }();
  return g->manifest.is_null() ? nullptr : g;
}

#define REQUIRE_GOLDENS() \
  if (!goldens()) GTEST_SKIP() << kDir << "/goldens.json is missing (tools/reference/make_vision_goldens.py)"

// max |a - b| over the first `cols` columns of rows of width `width`.
float max_diff(const std::vector<float>& a, const std::vector<float>& b, int64_t width, int64_t cols) {
  EXPECT_EQ(a.size() / width, b.size() / width);
  float m = 0;
  for (size_t r = 0; r < std::min(a.size(), b.size()) / width; ++r)
    for (int64_t c = 0; c < cols; ++c) m = std::max(m, std::fabs(a[r * width + c] - b[r * width + c]));
  return m;
}
float max_abs(const std::vector<float>& a) {
  float m = 0;
  for (float x : a) m = std::max(m, std::fabs(x));
  return m;
}

std::vector<float> slice(const std::vector<float>& v, size_t index, size_t count) {
  return std::vector<float>(v.begin() + index * count, v.begin() + (index + 1) * count);
}

// The tower and projector through VisionEncoder, for a checkpoint's vision weights.
void check_encoder(const VisionWeights& vw, Backend& be) {
  const Goldens& g = *goldens();
  auto enc = VisionEncoder::create(be, vw);
  ASSERT_TRUE(enc.ok()) << enc.status().to_string();
  const std::vector<float> pixels = g.load("pixels"), tower = g.load("tower"),
                           projected = g.load("projected");
  const size_t S = (*enc)->image_size(), N = (*enc)->tokens_per_image(), H = (*enc)->text_hidden();
  const size_t tower_size = tower.size() / 2;
  ASSERT_EQ(pixels.size(), 2 * 3 * S * S);
  for (size_t i = 0; i < 2; ++i) {
    std::vector<float> got_tower, out(N * H);
    ActivationHook hook = [&](int, const std::string& name, const float* d, int64_t n) {
      if (name == "vision_tower") got_tower.assign(d, d + n);
    };
    ASSERT_TRUE((*enc)->encode(pixels.data() + i * 3 * S * S, out.data(), &hook).ok());
    const std::vector<float> want_tower = slice(tower, i, tower_size), want_proj = slice(projected, i, N * H);
    ASSERT_EQ(got_tower.size(), want_tower.size());
    const float dt = max_diff(got_tower, want_tower, 1, 1), dp = max_diff(out, want_proj, 1, 1);
    ::testing::Test::RecordProperty("tower_rel_err_" + std::to_string(i),
                                    fmt::format("{:.2g}", dt / max_abs(want_tower)));
    ::testing::Test::RecordProperty("projected_rel_err_" + std::to_string(i),
                                    fmt::format("{:.2g}", dp / max_abs(want_proj)));
    EXPECT_LE(dt, 2e-5f * max_abs(want_tower)) << "image " << i;
    EXPECT_LE(dp, 2e-5f * max_abs(want_proj)) << "image " << i;
  }
}

TEST(Vision, TowerAndProjectorMatchTransformersHfFolder) {
  REQUIRE_GOLDENS();
  auto ckpt = Checkpoint::open(kDir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status().to_string();
  ASSERT_NE((*ckpt)->vision(), nullptr);
  for (const char* kernels : {"ref", "auto"}) {
    SCOPED_TRACE(kernels);
    auto be = make_cpu_backend_named(2, kernels);
    ASSERT_TRUE(be.ok());
    check_encoder(*(*ckpt)->vision(), **be);
  }
}

TEST(Vision, TowerAndProjectorMatchTransformersMmproj) {
  REQUIRE_GOLDENS();
  auto ckpt = Checkpoint::open(kDir + "/text-bf16.gguf");
  ASSERT_TRUE(ckpt.ok()) << ckpt.status().to_string();
  ASSERT_TRUE((*ckpt)->attach_vision(kDir + "/mmproj-bf16.gguf").ok());
  auto be = make_cpu_backend_named(2, "ref");
  ASSERT_TRUE(be.ok());
  check_encoder(*(*ckpt)->vision(), **be);
}

std::shared_ptr<Model> load(const std::string& path, int chunk = 64, const std::string& mmproj = "") {
  LoadOptions o;
  o.backend = BackendKind::kCpu;
  o.threads = 2;
  o.context = 256;
  o.prefill_chunk = chunk;
  o.kv_type = KvType::kF32;  // the goldens are fp32 end to end
  o.mmproj = mmproj;
  auto m = Model::load(path, o);
  EXPECT_TRUE(m.ok()) << m.status().to_string();
  return m.ok() ? *m : nullptr;
}

// Feeds a golden prompt: its text ids with feed_tokens and each image block (the N soft
// tokens and the ids around them) with feed_image_pixels. Returns the logits of every position.
std::vector<float> run_prompt(Session& s, const std::string& prompt, int vocab) {
  const Goldens& g = *goldens();
  const std::vector<int32_t> ids = g.ids(prompt);
  const std::vector<int> images = g.manifest["prompts"][prompt]["images"].get<std::vector<int>>();
  const std::vector<float> pixels = g.load("pixels");
  const size_t per_image = pixels.size() / 2;
  const int nl = static_cast<int>(g.manifest["newlines"].size());
  std::vector<float> logits;
  s.keep_all_logits(true);
  auto take = [&] { logits.insert(logits.end(), s.all_logits().begin(), s.all_logits().end()); };
  size_t i = 0, image = 0;
  while (i < ids.size()) {
    // Text up to the next image block ("\n\n" <boi> starts nl + 1 tokens before the first soft token).
    size_t soft = i;
    while (soft < ids.size() && ids[soft] != g.image_token()) ++soft;
    const size_t text_end = soft < ids.size() ? soft - nl - 1 : ids.size();
    if (text_end > i) {
      EXPECT_TRUE(s.feed_tokens(std::vector<int32_t>(ids.begin() + i, ids.begin() + text_end)).ok());
      take();
    }
    if (soft == ids.size()) break;
    const std::vector<float> px = slice(pixels, images.at(image++), per_image);
    Status st = s.feed_image_pixels(px);
    EXPECT_TRUE(st.ok()) << st.to_string();
    take();
    i = text_end;
    while (i < ids.size() && (i < soft || ids[i] == g.image_token())) ++i;
    i += 1 + nl;  // <eoi> "\n\n"
  }
  EXPECT_EQ(s.position(), static_cast<int>(ids.size()));
  EXPECT_EQ(logits.size(), ids.size() * vocab);
  return logits;
}

TEST(Vision, LogitsOneAndTwoImagesMatchTransformers) {
  REQUIRE_GOLDENS();
  auto m = load(kDir);
  ASSERT_TRUE(m);
  EXPECT_EQ(m->image_size(), 64);
  for (const char* prompt : {"one_image", "two_images"}) {
    SCOPED_TRACE(prompt);
    auto s = m->new_session();
    ASSERT_TRUE(s.ok());
    const std::vector<float> got = run_prompt(**s, prompt, m->vocab_size());
    const std::vector<float> want = goldens()->load(std::string(prompt) + ".logits");
    const float d = max_diff(got, want, 520, 520);
    ::testing::Test::RecordProperty(std::string(prompt) + "_max_abs_err", fmt::format("{:.2g}", d));
    EXPECT_LE(d, 1e-4f);
    EXPECT_EQ((*s)->stats().images, std::string(prompt) == "one_image" ? 1 : 2);
  }
}

TEST(Vision, LogitsThroughTextGgufAndMmproj) {
  REQUIRE_GOLDENS();
  auto m = load(kDir + "/text-bf16.gguf", 64, kDir + "/mmproj-bf16.gguf");
  ASSERT_TRUE(m);
  ASSERT_EQ(m->vocab_size(), 512);  // the converter dropped the 8 padding rows
  auto s = m->new_session();
  ASSERT_TRUE(s.ok());
  const std::vector<float> got = run_prompt(**s, "two_images", 512);
  const std::vector<float> want = goldens()->load("two_images.logits");
  std::vector<float> want512;
  for (size_t r = 0; r < want.size() / 520; ++r)
    want512.insert(want512.end(), want.begin() + r * 520, want.begin() + r * 520 + 512);
  EXPECT_LE(max_diff(got, want512, 512, 512), 1e-4f);
}

// The same one-image prompt through forward() directly, with the golden projector output as the
// image rows: with the bidirectional group it matches HF's token_type_ids run, without it HF's
// causal fallback, and the two differ (so the group is really applied).
TEST(Vision, BidirectionalGroupIsWhatMakesTheDifference) {
  REQUIRE_GOLDENS();
  const Goldens& g = *goldens();
  auto ckpt = Checkpoint::open(kDir);
  ASSERT_TRUE(ckpt.ok());
  const ModelConfig& c = (*ckpt)->config();
  auto be = make_cpu_backend_named(2, "ref");
  ASSERT_TRUE(be.ok());
  auto w = BackendModel::upload(**be, (*ckpt)->weights());
  ASSERT_TRUE(w.ok());
  const std::vector<int32_t> ids = g.ids("one_image");
  const std::vector<float> projected = g.load("projected");
  const int N = c.vision.tokens_per_image, V = c.vocab_size;
  const int first = static_cast<int>(std::find(ids.begin(), ids.end(), g.image_token()) - ids.begin());
  for (bool bidir : {true, false}) {
    KvCache cache(**be, plan_kv(c, 64, 32, DType::kF32));
    ASSERT_TRUE(cache.allocate(c).ok());
    ForwardScratch scratch(**be);
    ASSERT_TRUE(scratch.allocate(c, 32).ok());
    std::vector<float> logits(ids.size() * V);
    // [text before] [N image rows] [text after]
    const int bounds[] = {0, first, first + N, static_cast<int>(ids.size())};
    for (int part = 0; part < 3; ++part) {
      ForwardRequest req;
      req.ids = ids.data() + bounds[part];
      req.n = bounds[part + 1] - bounds[part];
      req.pos0 = bounds[part];
      req.all_logits = true;
      if (part == 1) {
        req.embeddings = projected.data();  // image 0: rows 0..N-1
        if (bidir) {
          req.bidir_begin = first;
          req.bidir_end = first + N;
        }
      }
      ASSERT_TRUE(
          forward(c, *w, **be, cache.view(), scratch, req, logits.data() + int64_t{bounds[part]} * V, nullptr)
              .ok());
    }
    const std::vector<float> want = g.load(bidir ? "one_image.logits" : "one_image_causal.logits");
    EXPECT_LE(max_diff(logits, want, V, V), 1e-4f) << (bidir ? "bidirectional" : "causal");
    const std::vector<float> other = g.load(bidir ? "one_image_causal.logits" : "one_image.logits");
    EXPECT_GT(max_diff(logits, other, V, V), 0.1f) << "the group changed nothing";
  }
}

TEST(Vision, SecondQuestionAboutTheSameImageUsesTheCache) {
  REQUIRE_GOLDENS();
  auto m = load(kDir);
  ASSERT_TRUE(m);
  auto s = m->new_session();
  ASSERT_TRUE(s.ok());
  const std::vector<float> px = slice(goldens()->load("pixels"), 0, 3 * 64 * 64);
  ASSERT_TRUE((*s)->feed_image_pixels(px).ok());
  const std::vector<float> first = testutil::to_vector((*s)->last_logits());
  EXPECT_EQ((*s)->stats().images_encoded, 1);
  EXPECT_GT((*s)->stats().image_encode_seconds, 0.0);
  (*s)->clear();
  ASSERT_TRUE((*s)->feed_image_pixels(px).ok());
  EXPECT_EQ((*s)->stats().images, 1);
  EXPECT_EQ((*s)->stats().images_encoded, 0) << "encoded again";
  EXPECT_EQ(testutil::to_vector((*s)->last_logits()), first);
  // A different image is encoded.
  ASSERT_TRUE((*s)->feed_image_pixels(slice(goldens()->load("pixels"), 1, 3 * 64 * 64)).ok());
  EXPECT_EQ((*s)->stats().images_encoded, 1);
  EXPECT_EQ((*s)->stats().images, 2);
}

TEST(Vision, EndToEndFromAnImageFile) {
  REQUIRE_GOLDENS();
  const Goldens& g = *goldens();
  const std::string file = kData + "/" + g.manifest["prompts"]["e2e"]["image_file"].get<std::string>();
  if (!fs::exists(file)) GTEST_SKIP() << file << " is missing";
  auto m = load(kDir);
  ASSERT_TRUE(m);
  auto s = m->new_session();
  ASSERT_TRUE(s.ok());
  const std::vector<int32_t> ids = g.ids("e2e");
  const size_t first = std::find(ids.begin(), ids.end(), g.image_token()) - ids.begin();
  const size_t nl = g.manifest["newlines"].size(), N = 16;
  ASSERT_TRUE((*s)->feed_tokens(std::vector<int32_t>(ids.begin(), ids.begin() + first - nl - 1)).ok());
  Status st = (*s)->feed_image(file);
  ASSERT_TRUE(st.ok()) << st.to_string();
  ASSERT_TRUE((*s)->feed_tokens(std::vector<int32_t>(ids.begin() + first + N + 1 + nl, ids.end())).ok());
  EXPECT_EQ((*s)->position(), static_cast<int>(ids.size()));
  // The preprocessing is Pillow-exact (image.h), so the fp32 logits tolerance applies.
  const std::vector<float> want = g.load("e2e.last_logits");
  const float d = max_diff(testutil::to_vector((*s)->last_logits()), want, 520, 520);
  ::testing::Test::RecordProperty("e2e_max_abs_err", fmt::format("{:.2g}", d));
  EXPECT_LE(d, 1e-4f);
}

// Chat with an image and no marker puts the image block before the text, exactly as feeding the
// rendered pieces by hand; a second question about the same file does not re-encode it.
TEST(Vision, ChatPlacesImagesAndCachesThem) {
  REQUIRE_GOLDENS();
  const std::string file = kData + "/images/rgb_300x90.png";
  if (!fs::exists(file)) GTEST_SKIP() << file << " is missing";
  auto m = load(kDir);
  ASSERT_TRUE(m);
  const Tokenizer& tok = m->tokenizer();
  auto chat = m->new_session();
  ASSERT_TRUE(chat.ok());
  Status st = (*chat)->feed_chat({{"user", "What is this?", {file}}});
  ASSERT_TRUE(st.ok()) << st.to_string();

  auto manual = m->new_session();
  ASSERT_TRUE(manual.ok());
  auto enc = [&](const std::string& t) { return *tok.encode(t); };
  std::vector<int32_t> head = {tok.bos_id(), tok.start_of_turn_id()};
  for (int32_t id : enc("user\n")) head.push_back(id);
  ASSERT_TRUE((*manual)->feed_tokens(head).ok());
  ASSERT_TRUE((*manual)->feed_image(file).ok());
  std::vector<int32_t> tail = enc("What is this?");
  tail.push_back(tok.end_of_turn_id());
  for (int32_t id : enc("\n")) tail.push_back(id);
  tail.push_back(tok.start_of_turn_id());
  for (int32_t id : enc("model\n")) tail.push_back(id);
  ASSERT_TRUE((*manual)->feed_tokens(tail).ok());
  ASSERT_EQ((*chat)->position(), (*manual)->position());
  EXPECT_LE(max_diff(testutil::to_vector((*chat)->last_logits()),
                     testutil::to_vector((*manual)->last_logits()), 1, 1),
            1e-5f);

  // A marker in the text places the image there; the same file again comes from the cache.
  st = (*chat)->feed_chat({{"user", "And here <start_of_image> again?", {file}}});
  ASSERT_TRUE(st.ok()) << st.to_string();
  EXPECT_EQ((*chat)->stats().images, 2);
  EXPECT_EQ((*chat)->stats().images_encoded, 1);
  // Marker count must match.
  st = (*chat)->feed_chat({{"user", "<start_of_image><start_of_image>", {file}}});
  EXPECT_EQ(st.code(), ErrorCode::kInvalidArgument) << st.to_string();
}

TEST(Vision, Errors) {
  REQUIRE_GOLDENS();
  const std::vector<float> px = slice(goldens()->load("pixels"), 0, 3 * 64 * 64);
  {  // A text-only model.
    auto m = load(kData + "/tiny");
    ASSERT_TRUE(m);
    EXPECT_EQ(m->image_size(), 0);
    auto s = m->new_session();
    ASSERT_TRUE(s.ok());
    Status st = (*s)->feed_image_pixels(px);
    EXPECT_EQ(st.code(), ErrorCode::kUnsupported) << st.to_string();
    EXPECT_NE(st.message().find("no vision tower"), std::string::npos) << st.message();
    st = (*s)->feed_chat({{"user", "hi", {kData + "/images/rgb_300x90.png"}}});
    EXPECT_EQ(st.code(), ErrorCode::kUnsupported) << st.to_string();
  }
  {  // A prefill chunk smaller than an image.
    auto m = load(kDir, 8);
    ASSERT_TRUE(m);
    auto s = m->new_session();
    ASSERT_TRUE(s.ok());
    Status st = (*s)->feed_image_pixels(px);
    EXPECT_EQ(st.code(), ErrorCode::kInvalidArgument) << st.to_string();
    EXPECT_NE(st.message().find("chunk"), std::string::npos) << st.message();
  }
  {  // Wrong pixel count, missing file.
    auto m = load(kDir);
    ASSERT_TRUE(m);
    auto s = m->new_session();
    ASSERT_TRUE(s.ok());
    EXPECT_EQ((*s)->feed_image_pixels(std::vector<float>(10)).code(), ErrorCode::kInvalidArgument);
    EXPECT_FALSE((*s)->feed_image(kDir + "/no-such.png").ok());
    EXPECT_EQ((*s)->position(), 0);
  }
}

}  // namespace
}  // namespace gemma3

namespace gemma3 {
namespace {

// The fast CPU attention against the reference with a bidirectional group, at awkward shapes:
// the group at the start/middle/end of the chunk, windows smaller than / equal to / larger than
// the group, ring slots that wrap, and a long context with few tokens (the split-key path).
TEST(VisionAttention, FastMatchesReferenceWithBidirectionalGroups) {
  auto ref = make_cpu_backend_named(2, "ref");
  auto fast = make_cpu_backend_named(4, "auto");  // 4 threads: 2 tokens x 2 kv heads split their keys
  ASSERT_TRUE(ref.ok() && fast.ok());
  struct Case {
    int pos0, n, bb, be, window, capacity;
  };
  const Case cases[] = {
      {0, 64, 0, 64, 0, 64},       // the vision tower: everything bidirectional
      {5, 20, 8, 24, 8, 32},       // group longer than the window, ring of W + n - 1 + some
      {5, 20, 5, 9, 8, 27},        // group at the chunk start, ring exactly W + n - 1
      {5, 20, 21, 25, 4, 23},      // group at the chunk end, window 4
      {40, 17, 41, 57, 16, 40},    // window = group length, ring wraps
      {40, 17, 41, 57, 17, 40},    // window = group + 1
      {700, 2, 700, 702, 0, 800},  // few tokens, long context: split keys
  };
  std::mt19937 g(7);
  std::normal_distribution<float> d(0.0f, 1.0f);
  for (const Case& c : cases) {
    ASSERT_LE(c.be, c.pos0 + c.n);
    SCOPED_TRACE(::testing::Message() << "pos0 " << c.pos0 << " n " << c.n << " group " << c.bb << ".."
                                      << c.be << " window " << c.window);
    const int n_heads = 4, n_kv = 2, hd = 16, kvw = n_kv * hd;
    const int total = c.pos0 + c.n;
    std::vector<float> k(static_cast<size_t>(total) * kvw), v(k.size()),
        q(static_cast<size_t>(c.n) * n_heads * hd);
    for (float* a : {k.data(), v.data()})
      for (size_t i = 0; i < k.size(); ++i) a[i] = d(g);
    for (float& x : q) x = d(g);
    AttentionParams p;
    p.n_tokens = c.n;
    p.pos0 = c.pos0;
    p.n_heads = n_heads;
    p.n_kv_heads = n_kv;
    p.head_dim = hd;
    p.scale = 0.25f;
    p.window = c.window;
    p.kv_start = 0;
    p.bidir_begin = c.bb;
    p.bidir_end = c.be;
    std::vector<float> out[2];
    int b = 0;
    for (Backend* be : {ref->get(), fast->get()}) {
      std::vector<float> kc(static_cast<size_t>(c.capacity) * kvw), vc(kc.size());
      KvLayer layer{kc.data(), vc.data(), c.capacity, DType::kF32};
      // Every position up to the chunk; older ones are overwritten in the ring as in a session.
      be->kv_write(k.data(), v.data(), total, 0, kvw, layer);
      out[b].assign(q.size(), 0.0f);
      be->attention(q.data(), layer, p, out[b].data());
      ++b;
    }
    float m = 0;
    for (size_t i = 0; i < q.size(); ++i) m = std::max(m, std::fabs(out[0][i] - out[1][i]));
    EXPECT_LE(m, 2e-6f);
    // The group is really used: the first query of the group sees the group's later keys.
    AttentionParams causal = p;
    causal.bidir_begin = causal.bidir_end = 0;
    std::vector<float> kc(static_cast<size_t>(c.capacity) * kvw), vc(kc.size()), plain(q.size());
    KvLayer layer{kc.data(), vc.data(), c.capacity, DType::kF32};
    (*ref)->kv_write(k.data(), v.data(), total, 0, kvw, layer);
    (*ref)->attention(q.data(), layer, causal, plain.data());
    const size_t first = static_cast<size_t>(c.bb - c.pos0) * n_heads * hd;
    float changed = 0;
    for (size_t i = first; i < first + n_heads * hd; ++i)
      changed = std::max(changed, std::fabs(plain[i] - out[0][i]));
    EXPECT_GT(changed, 1e-3f);
  }
}

// A wide image with Pan & Scan: the original and two crops, each its own block, with HF's
// connecting text; without Pan & Scan one block.
TEST(Vision, PanAndScanAddsCrops) {
  REQUIRE_GOLDENS();
  // A 600 x 300 24-bit BMP (ratio 2: two 300 x 300 crops, both >= 256 px).
  const int W = 600, Hh = 300, stride = W * 3;
  std::vector<uint8_t> bmp(54 + static_cast<size_t>(stride) * Hh);
  auto put32 = [&](size_t at, uint32_t x) {
    for (int i = 0; i < 4; ++i) bmp[at + i] = static_cast<uint8_t>(x >> (8 * i));
  };
  bmp[0] = 'B';
  bmp[1] = 'M';
  put32(2, static_cast<uint32_t>(bmp.size()));
  put32(10, 54);
  put32(14, 40);
  put32(18, W);
  put32(22, Hh);
  bmp[26] = 1;
  bmp[28] = 24;
  put32(34, static_cast<uint32_t>(stride * Hh));
  for (size_t i = 54; i < bmp.size(); ++i) bmp[i] = static_cast<uint8_t>((i * 131) >> 3);
  const std::string path = testing::TempDir() + "/vision_wide.bmp";
  {
    std::ofstream f(path, std::ios::binary);
    f.write(reinterpret_cast<const char*>(bmp.data()), static_cast<std::streamsize>(bmp.size()));
  }
  for (bool pan : {false, true}) {
    LoadOptions o;
    o.backend = BackendKind::kCpu;
    o.context = 512;
    o.prefill_chunk = 64;
    o.pan_and_scan = pan;
    auto m = Model::load(kDir, o);
    ASSERT_TRUE(m.ok()) << m.status().to_string();
    auto s = (*m)->new_session();
    ASSERT_TRUE(s.ok());
    Status st = (*s)->feed_image(path);
    ASSERT_TRUE(st.ok()) << st.to_string();
    EXPECT_EQ((*s)->stats().images, pan ? 3 : 1);
    EXPECT_EQ((*s)->stats().images_encoded, pan ? 3 : 1);
    const int block = 16 + 2 + 2 * 2;  // N + boi/eoi + two "\n\n" (two byte tokens each here)
    if (!pan)
      EXPECT_EQ((*s)->position(), 1 + block);
    else
      EXPECT_GT((*s)->position(), 1 + 3 * block);  // plus "Here is the original image" ...
  }
  std::filesystem::remove(path);
}

}  // namespace
}  // namespace gemma3
