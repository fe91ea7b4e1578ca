// Checkpoint::open on checkpoints that are wrong in exactly one way: each must fail with the
// right error code and a message naming the file and the tensor or field at fault. The good
// starting points come from make_model (tiny shapes); the faults are injected by rewriting the
// file (tests/loader_test_util.h).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "checkpoint/weights.h"
#include "dev/make_model.h"
#include "loader_test_util.h"

namespace gemma3 {
namespace {

namespace fs = std::filesystem;
using testutil::find_plan;
using testutil::GgufEdit;
using testutil::rewrite_gguf;
using testutil::TensorPlan;

// tiny: H 96, I 160, L 8, nH 4, nKV 2, hd 32, V 512; Q8_0 matrices, F32 norms.
class LoaderErrors : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(testutil::temp_dir("loader_errors"));
    MakeModelOptions o;
    o.size = "tiny";
    o.type = DType::kQ8_0;
    o.seed = 7;
    ASSERT_TRUE(make_model(o, good_gguf(), nullptr).ok());
    o.type = DType::kF8E4M3;
    ASSERT_TRUE(make_model(o, good_hf(), nullptr).ok());
  }
  static void TearDownTestSuite() {
    fs::remove_all(*dir_);
    delete dir_;
  }
  static std::string good_gguf() { return *dir_ + "/good.gguf"; }
  static std::string good_hf() { return *dir_ + "/good-hf"; }
  static std::string path(const std::string& name) { return *dir_ + "/" + name; }

  // Opens `p` and checks the error code and that the message names the file and `what`.
  static void expect_error(const std::string& p, ErrorCode code, const std::vector<std::string>& what) {
    auto c = Checkpoint::open(p);
    ASSERT_FALSE(c.ok()) << p << " loaded but should not";
    const std::string& m = c.status().message();
    EXPECT_EQ(c.status().code(), code) << c.status().to_string();
    EXPECT_NE(m.find(fs::path(p).filename().string()), std::string::npos)
        << "message does not name the file: " << m;
    for (const std::string& w : what)
      EXPECT_NE(m.find(w), std::string::npos) << "message lacks '" << w << "': " << m;
  }

  static std::string copy_hf(const std::string& name) {
    const std::string d = path(name);
    fs::remove_all(d);
    fs::copy(good_hf(), d, fs::copy_options::recursive);
    return d;
  }

  static std::string* dir_;
};
std::string* LoaderErrors::dir_ = nullptr;

TEST_F(LoaderErrors, GoodFilesLoad) {
  auto g = Checkpoint::open(good_gguf());
  ASSERT_TRUE(g.ok()) << g.status().to_string();
  EXPECT_EQ((*g)->config().hidden, 96);
  auto h = Checkpoint::open(good_hf());
  ASSERT_TRUE(h.ok()) << h.status().to_string();
  EXPECT_EQ((*h)->config().vocab_size, 512);
}

TEST_F(LoaderErrors, MissingTensor) {
  const std::string p = path("missing_tensor.gguf");
  rewrite_gguf(good_gguf(), p, {[](GgufWriter&, std::vector<TensorPlan>& plan) {
                 std::erase_if(plan, [](const TensorPlan& t) { return t.name == "blk.3.attn_k.weight"; });
               }});
  expect_error(p, ErrorCode::kNotFound, {"blk.3.attn_k.weight", "missing"});
}

TEST_F(LoaderErrors, WrongShape) {
  const std::string p = path("wrong_shape.gguf");
  rewrite_gguf(good_gguf(), p, {[](GgufWriter&, std::vector<TensorPlan>& plan) {
                 find_plan(plan, "blk.0.ffn_gate.weight")->shape = {161, 96};  // I + 1 rows
               }});
  expect_error(p, ErrorCode::kInvalidFile, {"blk.0.ffn_gate.weight", "[161, 96]", "[160, 96]"});
}

TEST_F(LoaderErrors, WrongArchitecture) {
  const std::string p = path("llama.gguf");
  rewrite_gguf(good_gguf(), p, {[](GgufWriter& w, std::vector<TensorPlan>&) {
                 w.set_string("general.architecture", "llama");
               }});
  expect_error(p, ErrorCode::kUnsupported, {"general.architecture", "llama", "gemma3"});
}

TEST_F(LoaderErrors, UnknownTensorTypeId) {
  const std::string p = path("type99.gguf");
  rewrite_gguf(good_gguf(), p, {nullptr, [](GgufWriter& w) {
                                  for (auto& t : w.mutable_tensors())
                                    if (t.name == "blk.2.attn_q.weight") t.ggml_type = 99;
                                }});
  expect_error(p, ErrorCode::kUnsupported, {"blk.2.attn_q.weight", "99"});
}

TEST_F(LoaderErrors, TruncatedFile) {
  const std::string p = path("truncated.gguf");
  fs::copy_file(good_gguf(), p, fs::copy_options::overwrite_existing);
  fs::resize_file(p, fs::file_size(p) - 1000);
  expect_error(p, ErrorCode::kInvalidFile, {"truncated"});
  // Cut inside the metadata too.
  fs::resize_file(p, 2000);
  expect_error(p, ErrorCode::kInvalidFile, {"truncated"});
}

TEST_F(LoaderErrors, EmbeddingLengthDisagreesWithTokenEmbd) {
  const std::string p = path("embd_len.gguf");
  rewrite_gguf(good_gguf(), p,
               {[](GgufWriter& w, std::vector<TensorPlan>&) { w.set_u32("gemma3.embedding_length", 128); }});
  expect_error(p, ErrorCode::kInvalidFile, {"gemma3.embedding_length", "128", "token_embd.weight", "96"});
}

TEST_F(LoaderErrors, KQuantRowNotABlockMultiple) {
  // attn_q declared Q4_K with rows of 96 elements (a Q4_K block holds 256).
  const std::string p = path("q4k_rows.gguf");
  rewrite_gguf(good_gguf(), p, {nullptr, [](GgufWriter& w) {
                                  for (auto& t : w.mutable_tensors())
                                    if (t.name == "blk.1.attn_q.weight") t.ggml_type = 12;
                                }});
  expect_error(p, ErrorCode::kInvalidFile, {"blk.1.attn_q.weight", "96", "256"});
}

TEST_F(LoaderErrors, SoftcappingKey) {
  for (const char* key : {"gemma3.final_logit_softcapping", "gemma3.attn_logit_softcapping"}) {
    const std::string p = path("softcap.gguf");
    rewrite_gguf(good_gguf(), p, {[&](GgufWriter& w, std::vector<TensorPlan>&) { w.set_f32(key, 30.0f); }});
    expect_error(p, ErrorCode::kUnsupported, {key});
  }
}

TEST_F(LoaderErrors, HeadCountNotDividing) {
  const std::string p = path("heads.gguf");
  rewrite_gguf(good_gguf(), p, {[](GgufWriter& w, std::vector<TensorPlan>&) {
                 w.set_u32("gemma3.attention.head_count_kv", 3);
               }});
  expect_error(p, ErrorCode::kInvalidFile, {"gemma3.attention.head_count", "4", "3"});
}

TEST_F(LoaderErrors, TokenizerLargerThanEmbedding) {
  const std::string p = path("vocab.gguf");
  auto f = GgufFile::open(good_gguf());
  ASSERT_TRUE(f.ok());
  auto tokens = *f->get_string_array("tokenizer.ggml.tokens");
  auto scores = *f->get_float_array("tokenizer.ggml.scores");
  const std::vector<int64_t> types64 = *f->get_int_array("tokenizer.ggml.token_type");
  std::vector<int32_t> types(types64.begin(), types64.end());
  tokens.push_back("extra");
  scores.push_back(-1e6f);
  types.push_back(1);
  rewrite_gguf(good_gguf(), p, {[&](GgufWriter& w, std::vector<TensorPlan>&) {
                 w.set_string_array("tokenizer.ggml.tokens", tokens);
                 w.set_f32_array("tokenizer.ggml.scores", scores);
                 w.set_i32_array("tokenizer.ggml.token_type", types);
               }});
  expect_error(p, ErrorCode::kInvalidFile, {"513", "token_embd.weight", "512"});
}

// ---- Hugging Face folders ------------------------------------------------------------------

TEST_F(LoaderErrors, HfMissingConfig) {
  const std::string d = copy_hf("hf_no_config");
  fs::remove(d + "/config.json");
  expect_error(d, ErrorCode::kNotFound, {"config.json"});
}

TEST_F(LoaderErrors, HfMissingTokenizer) {
  const std::string d = copy_hf("hf_no_tokenizer");
  fs::remove(d + "/tokenizer.model");
  expect_error(d, ErrorCode::kNotFound, {"tokenizer.model"});
}

TEST_F(LoaderErrors, HfMissingTensor) {
  const std::string d = copy_hf("hf_missing_tensor");
  testutil::drop_safetensors(d + "/model.safetensors", {"model.layers.2.mlp.up_proj.weight",
                                                        "model.layers.2.mlp.up_proj.weight_scale"});
  expect_error(d, ErrorCode::kNotFound, {"layers.2.mlp.up_proj.weight", "missing"});
}

TEST_F(LoaderErrors, HfConfigVocabDisagreesWithEmbedding) {
  const std::string d = copy_hf("hf_vocab");
  nlohmann::json j;
  {
    std::ifstream in(d + "/config.json");
    j = nlohmann::json::parse(in);
  }
  j["vocab_size"] = 520;
  std::ofstream(d + "/config.json") << j.dump(2);
  expect_error(d, ErrorCode::kInvalidFile, {"embed_tokens.weight", "520", "512"});
}

}  // namespace
}  // namespace gemma3
