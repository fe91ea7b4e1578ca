// Vision tower + projector loading: mmproj GGUFs (make-model --vision) attached to a text GGUF,
// the vision tensors of a HF multimodal folder, the two legacy layouts (swapped FFN names,
// [out, in] projection), and files that are wrong in one way.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>

#include "checkpoint/vision_weights.h"
#include "checkpoint/weights.h"
#include "core/quant.h"
#include "dev/make_model.h"
#include "loader_test_util.h"

namespace gemma3 {
namespace {

namespace fs = std::filesystem;
using testutil::find_plan;
using testutil::rewrite_gguf;
using testutil::TensorPlan;

std::vector<float> row_of(const TensorView& t, int64_t r) {
  std::vector<float> v(t.cols());
  dequantize_row(t.dtype, t.row_ptr(r), v.data(), t.cols());
  if (!t.row_scale.empty())
    for (float& x : v) x *= t.row_scale.size() == 1 ? t.row_scale[0] : t.row_scale[r];
  return v;
}

// tiny: text H 96; vision Hv 64, Iv 96, 2 layers, 2 heads, 112 px / 14 = 8x8 patches, 4 tokens.
class VisionWeightsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(testutil::temp_dir("vision_weights"));
    MakeModelOptions o;
    o.size = "tiny";
    o.vision = true;
    o.seed = 9;
    o.type = DType::kF16;
    ASSERT_TRUE(make_model(o, text(), nullptr).ok());
    o.type = DType::kF8E4M3;
    ASSERT_TRUE(make_model(o, hf(), nullptr).ok());
    o.vision = false;
    o.hidden = 128;
    o.type = DType::kQ8_0;
    ASSERT_TRUE(make_model(o, *dir_ + "/wide.gguf", nullptr).ok());
  }
  static void TearDownTestSuite() {
    fs::remove_all(*dir_);
    delete dir_;
  }
  static std::string text() { return *dir_ + "/tiny.gguf"; }
  static std::string mmproj() { return *dir_ + "/tiny.mmproj.gguf"; }
  static std::string hf() { return *dir_ + "/tiny-fp8"; }
  static std::string path(const std::string& n) { return *dir_ + "/" + n; }

  static std::unique_ptr<Checkpoint> open_text(const std::string& p) {
    auto c = Checkpoint::open(p);
    EXPECT_TRUE(c.ok()) << c.status().to_string();
    return c.ok() ? std::move(c).value() : nullptr;
  }
  static void expect_attach_error(const std::string& mm, ErrorCode code, const std::vector<std::string>& what,
                                  const std::string& text_path = "") {
    auto c = open_text(text_path.empty() ? text() : text_path);
    ASSERT_TRUE(c);
    Status s = c->attach_vision(mm);
    ASSERT_FALSE(s.ok()) << mm << " attached but should not";
    EXPECT_EQ(s.code(), code) << s.to_string();
    EXPECT_NE(s.message().find(fs::path(mm).filename().string()), std::string::npos) << s.message();
    for (const std::string& w : what)
      EXPECT_NE(s.message().find(w), std::string::npos) << w << ": " << s.message();
    EXPECT_EQ(c->vision(), nullptr);
    EXPECT_FALSE(c->config().has_vision);
  }

  static std::string* dir_;
};
std::string* VisionWeightsTest::dir_ = nullptr;

TEST_F(VisionWeightsTest, MmprojAttaches) {
  EXPECT_EQ(make_model_mmproj_path(text()), mmproj());
  auto c = open_text(text());
  ASSERT_TRUE(c);
  ASSERT_TRUE(c->attach_vision(mmproj()).ok());
  const VisionWeights* v = c->vision();
  ASSERT_NE(v, nullptr);
  EXPECT_TRUE(c->config().has_vision);
  const VisionConfig& vc = c->config().vision;
  EXPECT_EQ(vc.hidden, 64);
  EXPECT_EQ(vc.intermediate, 96);
  EXPECT_EQ(vc.n_layers, 2);
  EXPECT_EQ(vc.n_heads, 2);
  EXPECT_EQ(vc.image_size, 112);
  EXPECT_EQ(vc.patch_size, 14);
  EXPECT_EQ(vc.tokens_per_image, 4);  // 8x8 patches pooled 4x4
  EXPECT_EQ(v->patch_embd.shape, (std::vector<int64_t>{64, 3, 14, 14}));
  EXPECT_EQ(v->patch_embd.dtype, DType::kF32);
  EXPECT_EQ(v->position_embd.shape, (std::vector<int64_t>{64, 64}));
  ASSERT_EQ(v->layers.size(), 2u);
  EXPECT_EQ(v->layers[1].fc1_w.shape, (std::vector<int64_t>{96, 64}));
  EXPECT_EQ(v->layers[1].fc2_w.shape, (std::vector<int64_t>{64, 96}));
  EXPECT_EQ(v->layers[1].fc1_w.name, "v.blk.1.ffn_up.weight");
  EXPECT_EQ(v->input_projection.shape, (std::vector<int64_t>{64, 96}));
  EXPECT_FALSE(v->ffn_swapped);
  EXPECT_FALSE(v->projection_transposed);
  EXPECT_EQ(v->all().size(), 3u + 16u * 2u + 4u);
  // The soft-embedding norm holds 1 + w (w ~ N(0, 0.05^2)).
  double mean = 0;
  for (int i = 0; i < 64; ++i) mean += static_cast<const float*>(v->soft_emb_norm.data)[i] / 64.0;
  EXPECT_NEAR(mean, 1.0, 0.05);
  // Attaching twice is refused.
  EXPECT_EQ(c->attach_vision(mmproj()).code(), ErrorCode::kInvalidArgument);
}

TEST_F(VisionWeightsTest, HfFolderMatchesMmproj) {
  auto g = open_text(text());
  ASSERT_TRUE(g && g->attach_vision(mmproj()).ok());
  auto h = open_text(hf());
  ASSERT_TRUE(h);
  ASSERT_NE(h->vision(), nullptr) << "a Gemma3ForConditionalGeneration folder loads its vision tower";
  const VisionWeights& a = *g->vision();
  const VisionWeights& b = *h->vision();
  EXPECT_EQ(h->config().vision.tokens_per_image, 4);
  // Same seed, same values: GGUF F16/F32 vs HF BF16 (the norm: 1 + w in both after loading).
  for (int i = 0; i < 64; ++i)
    EXPECT_NEAR(static_cast<const float*>(a.soft_emb_norm.data)[i],
                static_cast<const float*>(b.soft_emb_norm.data)[i], 2e-3);
  for (const auto& [ta, tb] :
       {std::pair{&a.input_projection, &b.input_projection},
        std::pair{&a.layers[1].fc2_w, &b.layers[1].fc2_w}, std::pair{&a.position_embd, &b.position_embd}}) {
    ASSERT_EQ(ta->shape, tb->shape) << ta->name;
    for (int64_t r : {int64_t{0}, ta->rows() - 1}) {
      auto ra = row_of(*ta, r), rb = row_of(*tb, r);
      for (size_t i = 0; i < ra.size(); ++i)
        ASSERT_NEAR(ra[i], rb[i], 1e-2 * std::abs(ra[i]) + 1e-4) << ta->name;
    }
  }
}

TEST_F(VisionWeightsTest, LegacySwappedFfnIsDetected) {
  const std::string p = path("swapped.mmproj.gguf");
  rewrite_gguf(mmproj(), p, {[](GgufWriter&, std::vector<TensorPlan>& plan) {
                 for (TensorPlan& t : plan) {
                   if (t.name.find("ffn_up") != std::string::npos)
                     t.name.replace(t.name.find("ffn_up"), 6, "ffn_down");
                   else if (t.name.find("ffn_down") != std::string::npos)
                     t.name.replace(t.name.find("ffn_down"), 8, "ffn_up");
                 }
               }});
  auto normal = open_text(text()), swapped = open_text(text());
  ASSERT_TRUE(normal->attach_vision(mmproj()).ok());
  Status s = swapped->attach_vision(p);
  ASSERT_TRUE(s.ok()) << s.to_string();
  const VisionWeights& a = *normal->vision();
  const VisionWeights& b = *swapped->vision();
  EXPECT_TRUE(b.ffn_swapped);
  EXPECT_EQ(b.layers[0].fc1_w.name, "v.blk.0.ffn_down.weight");
  EXPECT_EQ(b.layers[0].fc1_b.name, "v.blk.0.ffn_down.bias");
  EXPECT_EQ(row_of(a.layers[1].fc1_w, 3), row_of(b.layers[1].fc1_w, 3));
  EXPECT_EQ(row_of(a.layers[1].fc2_b, 0), row_of(b.layers[1].fc2_b, 0));
}

TEST_F(VisionWeightsTest, OutInProjectionIsTransposed) {
  auto ref = open_text(text());
  ASSERT_TRUE(ref->attach_vision(mmproj()).ok());
  const TensorView& w = ref->vision()->input_projection;  // [64, 96], F16
  std::vector<float> t(96 * 64);                          // [96, 64]: t[o][i] = w[i][o]
  for (int64_t i = 0; i < 64; ++i) {
    auto r = row_of(w, i);
    for (int64_t o = 0; o < 96; ++o) t[o * 64 + i] = r[o];
  }
  const std::string p = path("transposed.mmproj.gguf");
  rewrite_gguf(mmproj(), p, {[&](GgufWriter&, std::vector<TensorPlan>& plan) {
                 TensorPlan* tp = find_plan(plan, "mm.input_projection.weight");
                 tp->dtype = DType::kF32;
                 tp->shape = {96, 64};
                 tp->bytes.resize(t.size() * 4);
                 std::memcpy(tp->bytes.data(), t.data(), tp->bytes.size());
               }});
  auto c = open_text(text());
  Status s = c->attach_vision(p);
  ASSERT_TRUE(s.ok()) << s.to_string();
  const VisionWeights& v = *c->vision();
  EXPECT_TRUE(v.projection_transposed);
  ASSERT_EQ(v.input_projection.shape, (std::vector<int64_t>{64, 96}));
  for (int64_t i : {0, 17, 63}) EXPECT_EQ(row_of(v.input_projection, i), row_of(w, i)) << i;
}

TEST_F(VisionWeightsTest, MmprojOfAnotherModelSize) {
  expect_attach_error(mmproj(), ErrorCode::kInvalidFile, {"clip.vision.projection_dim", "96", "128"},
                      path("wide.gguf"));
  // Without the key, the projection's own shape catches it.
  const std::string p = path("no_projdim.mmproj.gguf");
  rewrite_gguf(mmproj(), p,
               {[](GgufWriter& w, std::vector<TensorPlan>&) { w.remove_key("clip.vision.projection_dim"); }});
  expect_attach_error(p, ErrorCode::kInvalidFile, {"mm.input_projection.weight", "[64, 96]", "128"},
                      path("wide.gguf"));
}

TEST_F(VisionWeightsTest, MmprojMissingTensor) {
  const std::string p = path("missing.mmproj.gguf");
  rewrite_gguf(mmproj(), p, {[](GgufWriter&, std::vector<TensorPlan>& plan) {
                 std::erase_if(plan, [](const TensorPlan& t) { return t.name == "v.blk.1.ln2.bias"; });
               }});
  expect_attach_error(p, ErrorCode::kNotFound, {"v.blk.1.ln2.bias", "missing"});
}

TEST_F(VisionWeightsTest, MmprojWrongShape) {
  const std::string p = path("shape.mmproj.gguf");
  rewrite_gguf(mmproj(), p, {[](GgufWriter&, std::vector<TensorPlan>& plan) {
                 find_plan(plan, "v.position_embd.weight")->shape = {63, 64};
               }});
  expect_attach_error(p, ErrorCode::kInvalidFile, {"v.position_embd.weight", "[63, 64]", "[64, 64]"});
  rewrite_gguf(mmproj(), p, {[](GgufWriter& w, std::vector<TensorPlan>&) {
                 w.set_u32("clip.vision.feed_forward_length", 128);
               }});
  expect_attach_error(p, ErrorCode::kInvalidFile, {"ffn_", "[128, 64]"});
}

TEST_F(VisionWeightsTest, MmprojWrongKind) {
  const std::string p = path("llava.mmproj.gguf");
  rewrite_gguf(mmproj(), p,
               {[](GgufWriter& w, std::vector<TensorPlan>&) { w.set_string("clip.projector_type", "mlp"); }});
  expect_attach_error(p, ErrorCode::kUnsupported, {"clip.projector_type", "mlp", "gemma3"});
  // The text model given where the mmproj belongs.
  expect_attach_error(text(), ErrorCode::kInvalidArgument, {"general.architecture", "text model"});
}

TEST_F(VisionWeightsTest, HfMissingVisionTensor) {
  const std::string d = path("hf_missing");
  fs::remove_all(d);
  fs::copy(hf(), d, fs::copy_options::recursive);
  testutil::drop_safetensors(d + "/model.safetensors",
                             {"vision_tower.vision_model.encoder.layers.1.mlp.fc2.bias"});
  auto c = Checkpoint::open(d);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), ErrorCode::kNotFound);
  EXPECT_NE(c.status().message().find("vision_tower.vision_model.encoder.layers.1.mlp.fc2.bias"),
            std::string::npos)
      << c.status().message();
  EXPECT_NE(c.status().message().find("hf_missing"), std::string::npos) << c.status().message();
}

}  // namespace
}  // namespace gemma3
