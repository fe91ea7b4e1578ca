// parse_hf_config on the official Gemma 3 config.json files (written inline: the sparse
// multimodal ones as listed in docs/architecture.md §1.2, the complete 270M/1B ones) and on
// broken variants. Expected values are the table in docs/architecture.md §1.1.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "checkpoint/hf_config.h"

namespace gemma3 {
namespace {

using json = nlohmann::json;

const char* const k4B = R"({
  "architectures": ["Gemma3ForConditionalGeneration"],
  "boi_token_index": 255999,
  "eoi_token_index": 256000,
  "eos_token_id": [1, 106],
  "image_token_index": 262144,
  "initializer_range": 0.02,
  "mm_tokens_per_image": 256,
  "model_type": "gemma3",
  "text_config": {
    "hidden_size": 2560,
    "intermediate_size": 10240,
    "model_type": "gemma3_text",
    "num_hidden_layers": 34,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
    "sliding_window": 1024
  },
  "torch_dtype": "bfloat16",
  "transformers_version": "4.50.0.dev0",
  "vision_config": {
    "hidden_size": 1152,
    "image_size": 896,
    "intermediate_size": 4304,
    "model_type": "siglip_vision_model",
    "num_attention_heads": 16,
    "num_hidden_layers": 27,
    "patch_size": 14,
    "vision_use_head": false
  }
})";

const char* const k12B = R"({
  "architectures": ["Gemma3ForConditionalGeneration"],
  "boi_token_index": 255999,
  "eoi_token_index": 256000,
  "eos_token_id": [1, 106],
  "image_token_index": 262144,
  "initializer_range": 0.02,
  "mm_tokens_per_image": 256,
  "model_type": "gemma3",
  "text_config": {
    "hidden_size": 3840,
    "intermediate_size": 15360,
    "model_type": "gemma3_text",
    "num_attention_heads": 16,
    "num_hidden_layers": 48,
    "num_key_value_heads": 8,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
    "sliding_window": 1024
  },
  "torch_dtype": "bfloat16",
  "transformers_version": "4.50.0.dev0",
  "vision_config": {
    "hidden_size": 1152,
    "image_size": 896,
    "intermediate_size": 4304,
    "model_type": "siglip_vision_model",
    "num_attention_heads": 16,
    "num_hidden_layers": 27,
    "patch_size": 14,
    "vision_use_head": false
  }
})";

const char* const k27B = R"({
  "architectures": ["Gemma3ForConditionalGeneration"],
  "boi_token_index": 255999,
  "eoi_token_index": 256000,
  "eos_token_id": [1, 106],
  "image_token_index": 262144,
  "initializer_range": 0.02,
  "mm_tokens_per_image": 256,
  "model_type": "gemma3",
  "text_config": {
    "head_dim": 128,
    "hidden_size": 5376,
    "intermediate_size": 21504,
    "model_type": "gemma3_text",
    "num_attention_heads": 32,
    "num_hidden_layers": 62,
    "num_key_value_heads": 16,
    "query_pre_attn_scalar": 168,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
    "sliding_window": 1024
  },
  "torch_dtype": "bfloat16",
  "transformers_version": "4.50.0.dev0",
  "vision_config": {
    "hidden_size": 1152,
    "image_size": 896,
    "intermediate_size": 4304,
    "model_type": "siglip_vision_model",
    "num_attention_heads": 16,
    "num_hidden_layers": 27,
    "patch_size": 14,
    "vision_use_head": false
  }
})";

// gemma-3-1b-it: complete, old key names (sliding_window_pattern, rope_theta as an integer).
const char* const k1B = R"({
  "architectures": ["Gemma3ForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "attn_logit_softcapping": null,
  "bos_token_id": 2,
  "cache_implementation": "hybrid",
  "eos_token_id": [1, 106],
  "final_logit_softcapping": null,
  "head_dim": 256,
  "hidden_activation": "gelu_pytorch_tanh",
  "hidden_size": 1152,
  "initializer_range": 0.02,
  "intermediate_size": 6912,
  "max_position_embeddings": 32768,
  "model_type": "gemma3_text",
  "num_attention_heads": 4,
  "num_hidden_layers": 26,
  "num_key_value_heads": 1,
  "pad_token_id": 0,
  "query_pre_attn_scalar": 256,
  "rms_norm_eps": 1e-06,
  "rope_local_base_freq": 10000,
  "rope_scaling": null,
  "rope_theta": 1000000,
  "sliding_window": 512,
  "sliding_window_pattern": 6,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.50.0.dev0",
  "use_cache": true,
  "vocab_size": 262144
})";

// gemma-3-270m: complete, newer keys (layer_types, _sliding_window_pattern).
const char* const k270M = R"({
  "_sliding_window_pattern": 6,
  "architectures": ["Gemma3ForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "attn_logit_softcapping": null,
  "bos_token_id": 2,
  "eos_token_id": 1,
  "final_logit_softcapping": null,
  "head_dim": 256,
  "hidden_activation": "gelu_pytorch_tanh",
  "hidden_size": 640,
  "initializer_range": 0.02,
  "intermediate_size": 2048,
  "layer_types": [
    "sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention",
    "full_attention",
    "sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention",
    "full_attention",
    "sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention",
    "full_attention"
  ],
  "max_position_embeddings": 32768,
  "model_type": "gemma3_text",
  "num_attention_heads": 4,
  "num_hidden_layers": 18,
  "num_key_value_heads": 1,
  "pad_token_id": 0,
  "query_pre_attn_scalar": 256,
  "rms_norm_eps": 1e-06,
  "rope_local_base_freq": 10000.0,
  "rope_scaling": null,
  "rope_theta": 1000000.0,
  "sliding_window": 512,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.55.0.dev0",
  "use_bidirectional_attention": false,
  "use_cache": true,
  "vocab_size": 262144
})";

std::vector<int> global_layers(const ModelConfig& c) {
  std::vector<int> g;
  for (int i = 0; i < c.n_layers; ++i)
    if (c.is_global(i)) g.push_back(i);
  return g;
}

// 5, 11, 17, ... below n
std::vector<int> every_sixth(int n) {
  std::vector<int> g;
  for (int i = 5; i < n; i += 6) g.push_back(i);
  return g;
}

Result<ModelConfig> parse(const json& j) { return parse_hf_config(j.dump(), "test/config.json"); }

void expect_error(const Status& s, ErrorCode code, const std::vector<std::string>& parts) {
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), code) << s.to_string();
  for (const std::string& p : parts)
    EXPECT_NE(s.message().find(p), std::string::npos) << "'" << p << "' not in: " << s.message();
}

void expect_multimodal_common(const ModelConfig& c) {
  EXPECT_EQ(c.vocab_size, 262208);  // Gemma3TextConfig default, absent from the sparse file
  EXPECT_EQ(c.sliding_window, 1024);
  EXPECT_EQ(c.max_context, 131072);
  EXPECT_FLOAT_EQ(c.rope_theta_global, 1e6f);
  EXPECT_FLOAT_EQ(c.rope_theta_local, 1e4f);
  EXPECT_FLOAT_EQ(c.rope_scale_global, 8.0f);
  EXPECT_FLOAT_EQ(c.rms_norm_eps, 1e-6f);
  EXPECT_EQ(c.eos_ids, (std::vector<int>{1, 106}));
  EXPECT_EQ(c.bos_id, 2);
  EXPECT_TRUE(c.has_vision);
  EXPECT_EQ(c.boi_id, 255999);
  EXPECT_EQ(c.eoi_id, 256000);
  EXPECT_EQ(c.image_token_id, 262144);
  EXPECT_EQ(c.vision.hidden, 1152);
  EXPECT_EQ(c.vision.intermediate, 4304);
  EXPECT_EQ(c.vision.n_layers, 27);
  EXPECT_EQ(c.vision.n_heads, 16);
  EXPECT_EQ(c.vision.image_size, 896);
  EXPECT_EQ(c.vision.patch_size, 14);
  EXPECT_EQ(c.vision.tokens_per_image, 256);
  EXPECT_FLOAT_EQ(c.vision.layer_norm_eps, 1e-6f);
  EXPECT_EQ(static_cast<int>(c.layer_types.size()), c.n_layers);
  EXPECT_EQ(global_layers(c), every_sixth(c.n_layers));
}

TEST(HfConfig, Sparse4B) {
  auto c = parse_hf_config(k4B, "gemma-3-4b-it/config.json");
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  expect_multimodal_common(*c);
  EXPECT_EQ(c->size_label, "4B");
  EXPECT_EQ(c->n_layers, 34);
  EXPECT_EQ(c->hidden, 2560);
  EXPECT_EQ(c->intermediate, 10240);
  EXPECT_EQ(c->n_heads, 8);
  EXPECT_EQ(c->n_kv_heads, 4);
  EXPECT_EQ(c->head_dim, 256);
  EXPECT_FLOAT_EQ(c->query_pre_attn_scalar, 256.0f);
  EXPECT_FLOAT_EQ(c->attn_scale(), 0.0625f);
  EXPECT_EQ(global_layers(*c), (std::vector<int>{5, 11, 17, 23, 29}));
}

TEST(HfConfig, Sparse12B) {
  auto c = parse_hf_config(k12B, "gemma-3-12b-it/config.json");
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  expect_multimodal_common(*c);
  EXPECT_EQ(c->size_label, "12B");
  EXPECT_EQ(c->n_layers, 48);
  EXPECT_EQ(c->hidden, 3840);
  EXPECT_EQ(c->intermediate, 15360);
  EXPECT_EQ(c->n_heads, 16);
  EXPECT_EQ(c->n_kv_heads, 8);
  EXPECT_EQ(c->head_dim, 256);
  EXPECT_EQ(c->q_width(), 4096);
  EXPECT_FLOAT_EQ(c->query_pre_attn_scalar, 256.0f);
  EXPECT_EQ(c->n_global_layers(), 8);
  EXPECT_EQ(global_layers(*c).back(), 47);
}

TEST(HfConfig, Sparse27B) {
  auto c = parse_hf_config(k27B, "gemma-3-27b-it/config.json");
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  expect_multimodal_common(*c);
  EXPECT_EQ(c->size_label, "27B");
  EXPECT_EQ(c->n_layers, 62);
  EXPECT_EQ(c->hidden, 5376);
  EXPECT_EQ(c->intermediate, 21504);
  EXPECT_EQ(c->n_heads, 32);
  EXPECT_EQ(c->n_kv_heads, 16);
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_EQ(c->q_width(), 4096);
  EXPECT_EQ(c->kv_width(), 2048);
  EXPECT_FLOAT_EQ(c->query_pre_attn_scalar, 168.0f);
  EXPECT_NEAR(c->attn_scale(), 0.0771516750, 1e-7);  // 168^-0.5
  EXPECT_EQ(c->n_global_layers(), 10);
  EXPECT_EQ(global_layers(*c).back(), 59);
  EXPECT_FALSE(c->is_global(60));
  EXPECT_FALSE(c->is_global(61));
}

TEST(HfConfig, Full1B) {
  auto c = parse_hf_config(k1B, "gemma-3-1b-it/config.json");
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  EXPECT_EQ(c->size_label, "1B");
  EXPECT_EQ(c->n_layers, 26);
  EXPECT_EQ(c->hidden, 1152);
  EXPECT_EQ(c->intermediate, 6912);
  EXPECT_EQ(c->n_heads, 4);
  EXPECT_EQ(c->n_kv_heads, 1);
  EXPECT_EQ(c->head_dim, 256);
  EXPECT_EQ(c->vocab_size, 262144);
  EXPECT_EQ(c->sliding_window, 512);
  EXPECT_EQ(c->max_context, 32768);
  EXPECT_FLOAT_EQ(c->rope_theta_global, 1e6f);
  EXPECT_FLOAT_EQ(c->rope_theta_local, 1e4f);
  EXPECT_FLOAT_EQ(c->rope_scale_global, 1.0f);
  EXPECT_FLOAT_EQ(c->attn_scale(), 0.0625f);
  EXPECT_EQ(c->eos_ids, (std::vector<int>{1, 106}));
  EXPECT_EQ(c->bos_id, 2);
  EXPECT_FALSE(c->has_vision);
  EXPECT_EQ(global_layers(*c), (std::vector<int>{5, 11, 17, 23}));
}

TEST(HfConfig, Full270M) {
  auto c = parse_hf_config(k270M, "gemma-3-270m/config.json");
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  EXPECT_EQ(c->size_label, "270M");
  EXPECT_EQ(c->n_layers, 18);
  EXPECT_EQ(c->hidden, 640);
  EXPECT_EQ(c->intermediate, 2048);
  EXPECT_EQ(c->n_heads, 4);
  EXPECT_EQ(c->n_kv_heads, 1);
  EXPECT_EQ(c->head_dim, 256);
  EXPECT_EQ(c->vocab_size, 262144);
  EXPECT_EQ(c->sliding_window, 512);
  EXPECT_EQ(c->max_context, 32768);
  EXPECT_FLOAT_EQ(c->rope_scale_global, 1.0f);
  EXPECT_EQ(c->eos_ids, (std::vector<int>{1}));
  EXPECT_FALSE(c->has_vision);
  EXPECT_EQ(global_layers(*c), (std::vector<int>{5, 11, 17}));
}

TEST(HfConfig, ExplicitLayerTypesOverrideThePattern) {
  json j = json::parse(k1B);
  std::vector<std::string> types(26, "sliding_attention");
  types[0] = "full_attention";
  types[25] = "full_attention";
  j["layer_types"] = types;  // sliding_window_pattern 6 is still there and must lose
  auto c = parse(j);
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  EXPECT_EQ(global_layers(*c), (std::vector<int>{0, 25}));

  j["layer_types"] = std::vector<std::string>(25, "sliding_attention");
  expect_error(parse(j).status(), ErrorCode::kInvalidFile, {"test/config.json", "layer_types", "25", "26"});
  types[3] = "local";
  j["layer_types"] = types;
  expect_error(parse(j).status(), ErrorCode::kInvalidFile, {"layer_types[3]", "local"});
}

TEST(HfConfig, SlidingWindowPatternIsRead) {
  json j = json::parse(k1B);
  j["sliding_window_pattern"] = 2;
  auto c = parse(j);
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  EXPECT_EQ(c->n_global_layers(), 13);
  EXPECT_TRUE(c->is_global(1));
  EXPECT_FALSE(c->is_global(0));
}

TEST(HfConfig, RopeParametersPerLayerType) {
  // transformers >= 5 style: no rope_theta/rope_local_base_freq/rope_scaling.
  json j = json::parse(k4B);
  j["text_config"].erase("rope_scaling");
  j["text_config"]["rope_parameters"] = {
      {"full_attention", {{"rope_type", "linear"}, {"factor", 8.0}, {"rope_theta", 500000.0}}},
      {"sliding_attention", {{"rope_type", "default"}, {"rope_theta", 20000.0}}}};
  auto c = parse(j);
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  EXPECT_FLOAT_EQ(c->rope_theta_global, 5e5f);
  EXPECT_FLOAT_EQ(c->rope_theta_local, 2e4f);
  EXPECT_FLOAT_EQ(c->rope_scale_global, 8.0f);

  // Scaling local layers is not something our forward does.
  j["text_config"]["rope_parameters"]["sliding_attention"] = {{"rope_type", "linear"}, {"factor", 2.0}};
  expect_error(parse(j).status(), ErrorCode::kUnsupported, {"sliding_attention", "factor"});

  // Neither sub-dict: refuse rather than guess which layers it means.
  j["text_config"]["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 10000.0}};
  expect_error(parse(j).status(), ErrorCode::kInvalidFile, {"text_config.rope_parameters"});
}

TEST(HfConfig, RopeScalingVariants) {
  json j = json::parse(k4B);
  j["text_config"]["rope_scaling"] = {{"type", "linear"}, {"factor", 4.0}};  // old "type" key
  auto c = parse(j);
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  EXPECT_FLOAT_EQ(c->rope_scale_global, 4.0f);
  EXPECT_FLOAT_EQ(c->rope_theta_local, 1e4f);

  j["text_config"]["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
  expect_error(parse(j).status(), ErrorCode::kUnsupported, {"yarn"});
  j["text_config"]["rope_scaling"] = {{"rope_type", "linear"}};
  expect_error(parse(j).status(), ErrorCode::kInvalidFile, {"text_config.rope_scaling.factor"});
  j["text_config"]["rope_scaling"] = nullptr;
  c = parse(j);
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  EXPECT_FLOAT_EQ(c->rope_scale_global, 1.0f);
}

TEST(HfConfig, MissingRequiredKeyIsNamed) {
  json j = json::parse(k1B);
  j.erase("hidden_size");
  expect_error(parse(j).status(), ErrorCode::kInvalidFile, {"test/config.json", "'hidden_size'"});
  j = json::parse(k270M);
  j.erase("head_dim");  // a flat config must list it even though HF has a default
  expect_error(parse(j).status(), ErrorCode::kInvalidFile, {"'head_dim'"});
  j = json::parse(k4B);
  j["text_config"].erase("num_hidden_layers");
  expect_error(parse(j).status(), ErrorCode::kInvalidFile, {"'text_config.num_hidden_layers'"});
  j = json::parse(k4B);
  j.erase("text_config");
  expect_error(parse(j).status(), ErrorCode::kInvalidFile, {"'text_config.hidden_size'"});
}

TEST(HfConfig, WrongJsonTypeIsNamed) {
  json j = json::parse(k1B);
  j["num_attention_heads"] = "4";
  expect_error(parse(j).status(), ErrorCode::kInvalidFile, {"'num_attention_heads'", "string", "integer"});
  j = json::parse(k4B);
  j["text_config"]["sliding_window"] = 1024.5;
  expect_error(parse(j).status(), ErrorCode::kInvalidFile, {"'text_config.sliding_window'", "integer"});
  j = json::parse(k4B);
  j["text_config"] = "oops";
  expect_error(parse(j).status(), ErrorCode::kInvalidFile, {"'text_config'", "object"});
  j = json::parse(k1B);
  j["rope_theta"] = "1e6";
  expect_error(parse(j).status(), ErrorCode::kInvalidFile, {"'rope_theta'", "number"});
  j = json::parse(k1B);
  j["eos_token_id"] = {1, "x"};
  expect_error(parse(j).status(), ErrorCode::kInvalidFile, {"'eos_token_id'"});
  j = json::parse(k4B);
  j["vision_config"]["patch_size"] = nullptr;
  expect_error(parse(j).status(), ErrorCode::kInvalidFile, {"'vision_config.patch_size'", "null"});
  j = json::parse(k1B);
  j["hidden_size"] = 1ll << 40;
  expect_error(parse(j).status(), ErrorCode::kInvalidFile, {"'hidden_size'", "32 bits"});
}

TEST(HfConfig, UnsupportedModelsAndFeatures) {
  json j = json::parse(k1B);
  j["final_logit_softcapping"] = 30.0;
  expect_error(parse(j).status(), ErrorCode::kUnsupported, {"final_logit_softcapping", "30"});
  j = json::parse(k4B);
  j["text_config"]["attn_logit_softcapping"] = 50.0;
  expect_error(parse(j).status(), ErrorCode::kUnsupported, {"text_config.attn_logit_softcapping"});
  j = json::parse(k1B);
  j["model_type"] = "gemma2";
  expect_error(parse(j).status(), ErrorCode::kUnsupported, {"gemma2"});
  j = json::parse(k1B);
  j["architectures"] = {"Gemma3ForSequenceClassification"};
  expect_error(parse(j).status(), ErrorCode::kUnsupported, {"Gemma3ForSequenceClassification"});
  j = json::parse(k270M);
  j["use_bidirectional_attention"] = true;
  expect_error(parse(j).status(), ErrorCode::kUnsupported, {"use_bidirectional_attention"});
  j = json::parse(k1B);
  j["hidden_activation"] = "gelu";
  expect_error(parse(j).status(), ErrorCode::kUnsupported, {"hidden_activation", "gelu"});
  j = json::parse(k1B);
  j.erase("model_type");
  j.erase("architectures");
  expect_error(parse(j).status(), ErrorCode::kInvalidFile, {"model_type"});
}

TEST(HfConfig, ArchitecturesAloneSelectTheLayout) {
  json j = json::parse(k4B);
  j.erase("model_type");
  auto c = parse(j);
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  EXPECT_TRUE(c->has_vision);
  EXPECT_EQ(c->hidden, 2560);
}

TEST(HfConfig, SparseVisionConfigGetsSiglipDefaults) {
  json j = json::parse(k4B);
  j["vision_config"] = {{"model_type", "siglip_vision_model"}};
  j["mm_tokens_per_image"] = 196;  // 224/16 = 14 patches per side, pooled to 14x14
  auto c = parse(j);
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  EXPECT_EQ(c->vision.hidden, 768);  // SiglipVisionConfig defaults, as transformers fills them
  EXPECT_EQ(c->vision.n_layers, 12);
  EXPECT_EQ(c->vision.image_size, 224);
  EXPECT_EQ(c->vision.patch_size, 16);
  EXPECT_EQ(c->vision.tokens_per_image, 196);
  j["mm_tokens_per_image"] = 200;  // not a square
  expect_error(parse(j).status(), ErrorCode::kInvalidFile, {"mm_tokens_per_image", "200"});
}

TEST(HfConfig, ValidationRunsOnTheResult) {
  json j = json::parse(k1B);
  j["num_attention_heads"] = 5;
  j["num_key_value_heads"] = 2;
  expect_error(parse(j).status(), ErrorCode::kInvalidFile, {"test/config.json", "num_key_value_heads"});
  j = json::parse(k1B);
  j["num_hidden_layers"] = 0;
  expect_error(parse(j).status(), ErrorCode::kInvalidFile, {"num_hidden_layers"});
}

TEST(HfConfig, NotJson) {
  expect_error(parse_hf_config("{\"model_type\": ", "x.json").status(), ErrorCode::kInvalidFile,
               {"x.json", "JSON"});
  expect_error(parse_hf_config("[]", "x.json").status(), ErrorCode::kInvalidFile, {"x.json", "array"});
  expect_error(parse_hf_config("", "x.json").status(), ErrorCode::kInvalidFile, {"x.json"});
}

TEST(HfConfig, LoadFromFolder) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("gemma3_hfconfig_" + std::to_string(getpid()));
  fs::create_directories(dir);
  expect_error(load_hf_config(dir.string()).status(), ErrorCode::kNotFound, {"config.json"});
  std::ofstream((dir / "config.json").string()) << k270M;
  auto c = load_hf_config(dir.string());
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  EXPECT_EQ(c->hidden, 640);
  auto q = load_hf_quantization((dir / "config.json").string());
  ASSERT_TRUE(q.ok()) << q.status().to_string();
  EXPECT_EQ(q->kind, HfQuantKind::kNone);
  EXPECT_EQ(q->describe(), "none");
  fs::remove_all(dir);
}

// tests/data/tiny/config.json was written by transformers 5.24 (rope_parameters, layer_types);
// expected values read from that file by eye.
TEST(HfConfig, TinyModelWrittenByNewTransformers) {
  const std::string folder = std::string(GEMMA3_SOURCE_DIR) + "/tests/data/tiny";
  if (!std::filesystem::exists(folder + "/config.json"))
    GTEST_SKIP() << folder << "/config.json is not present";
  auto c = load_hf_config(folder);
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  EXPECT_EQ(c->size_label, "custom");
  EXPECT_EQ(c->n_layers, 8);
  EXPECT_EQ(c->hidden, 96);
  EXPECT_EQ(c->intermediate, 160);
  EXPECT_EQ(c->n_heads, 4);
  EXPECT_EQ(c->n_kv_heads, 2);
  EXPECT_EQ(c->head_dim, 32);
  EXPECT_EQ(c->vocab_size, 512);
  EXPECT_EQ(c->sliding_window, 8);
  EXPECT_EQ(c->max_context, 4096);
  EXPECT_FLOAT_EQ(c->query_pre_attn_scalar, 24.0f);
  EXPECT_FLOAT_EQ(c->rope_theta_global, 1e6f);
  EXPECT_FLOAT_EQ(c->rope_theta_local, 1e4f);
  EXPECT_FLOAT_EQ(c->rope_scale_global, 8.0f);
  EXPECT_EQ(c->eos_ids, (std::vector<int>{1}));
  EXPECT_EQ(global_layers(*c), (std::vector<int>{5}));
  EXPECT_FALSE(c->has_vision);
}

TEST(HfQuantization, CompressedTensorsFp8) {
  json j = json::parse(k4B);
  j["quantization_config"] = json::parse(R"({
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "quantization_status": "compressed",
    "config_groups": {
      "group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": true,
                    "dynamic": false, "group_size": null, "block_structure": null},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": true},
        "output_activations": null
      }
    },
    "ignore": ["lm_head", "re:vision_tower.*", "re:multi_modal_projector.*"],
    "kv_cache_scheme": null
  })");
  auto q = parse_hf_quantization(j.dump(), "fp8/config.json");
  ASSERT_TRUE(q.ok()) << q.status().to_string();
  EXPECT_EQ(q->kind, HfQuantKind::kFp8);
  EXPECT_EQ(q->quant_method, "compressed-tensors");
  EXPECT_EQ(q->format, "float-quantized");
  ASSERT_EQ(q->groups.size(), 1u);
  EXPECT_EQ(q->groups[0].name, "group_0");
  EXPECT_EQ(q->groups[0].targets, (std::vector<std::string>{"Linear"}));
  EXPECT_EQ(q->groups[0].num_bits, 8);
  EXPECT_EQ(q->groups[0].type, "float");
  EXPECT_EQ(q->groups[0].strategy, "channel");
  EXPECT_EQ(q->groups[0].group_size, 0);
  EXPECT_TRUE(q->groups[0].dynamic_activations);
  EXPECT_EQ(q->ignore.size(), 3u);
  EXPECT_NE(q->describe().find("8-bit float, channel"), std::string::npos) << q->describe();
  // The model config still parses alongside.
  EXPECT_TRUE(parse(j).ok());

  // Older spelling.
  json old = json::parse(k1B);
  old["compression_config"] = j["quantization_config"];
  old["compression_config"].erase("quant_method");
  q = parse_hf_quantization(old.dump(), "old/config.json");
  ASSERT_TRUE(q.ok()) << q.status().to_string();
  EXPECT_EQ(q->kind, HfQuantKind::kFp8);

  // Not compressed on disk ("frozen"): not the fp8 layout.
  j["quantization_config"]["quantization_status"] = "frozen";
  q = parse_hf_quantization(j.dump(), "fp8/config.json");
  ASSERT_TRUE(q.ok());
  EXPECT_EQ(q->kind, HfQuantKind::kOther);
}

TEST(HfQuantization, Int4PackAndOthers) {
  json j = json::parse(k1B);
  j["quantization_config"] = json::parse(R"({
    "quant_method": "compressed-tensors", "format": "pack-quantized",
    "config_groups": {"group_0": {"targets": ["Linear"],
      "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32, "symmetric": true}}},
    "ignore": ["lm_head"]})");
  auto q = parse_hf_quantization(j.dump(), "int4/config.json");
  ASSERT_TRUE(q.ok()) << q.status().to_string();
  EXPECT_EQ(q->kind, HfQuantKind::kInt4Pack);
  EXPECT_EQ(q->groups[0].group_size, 32);

  j["quantization_config"] = {{"quant_method", "fp8"}, {"weight_block_size", {128, 128}}};
  q = parse_hf_quantization(j.dump(), "hf-fp8/config.json");
  ASSERT_TRUE(q.ok()) << q.status().to_string();
  EXPECT_EQ(q->kind, HfQuantKind::kOther);
  EXPECT_EQ(q->quant_method, "fp8");

  j["quantization_config"] = {{"quant_method", "compressed-tensors"},
                              {"config_groups", {{"group_0", {{"weights", {{"num_bits", "8"}}}}}}}};
  expect_error(parse_hf_quantization(j.dump(), "bad/config.json").status(), ErrorCode::kInvalidFile,
               {"bad/config.json", "quantization_config.config_groups.group_0.weights.num_bits"});
}

}  // namespace
}  // namespace gemma3
