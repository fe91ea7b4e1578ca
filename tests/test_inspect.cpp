// gemma3::inspect, Model::info and Tokenizer::from_checkpoint (issue #16: the CLI's info,
// tokenize and bench read checkpoints through the public API). Public headers only.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "gemma3/gemma3.h"
#include "test_util.h"

namespace gemma3 {
namespace {

const std::string kTiny = testutil::data_path("tiny-f32.gguf");

// tiny-f32.gguf as tools/reference/make_tiny_model.py and convert_tiny_to_gguf.py made it: 8 layers (the 6th
// global), H 96, I 160, 4 query heads and 2 kv heads of 32, window 8, 4096 positions, 512 ids; 106 f32
// tensors of 2865536 bytes (`gemma3 info` lists them).
TEST(Inspect, TinyModelConfigAndTensors) {
  auto info = inspect(kTiny);
  ASSERT_TRUE(info.ok()) << info.status().to_string();
  EXPECT_EQ(info->path, kTiny);
  EXPECT_EQ(info->format, "gguf");
  EXPECT_EQ(info->n_layers, 8);
  EXPECT_EQ(info->layer_pattern, "LLLLLGLL");
  EXPECT_EQ(info->hidden, 96);
  EXPECT_EQ(info->intermediate, 160);
  EXPECT_EQ(info->n_heads, 4);
  EXPECT_EQ(info->n_kv_heads, 2);
  EXPECT_EQ(info->head_dim, 32);
  EXPECT_EQ(info->sliding_window, 8);
  EXPECT_EQ(info->max_context, 4096);
  EXPECT_EQ(info->vocab_size, 512);
  EXPECT_EQ(info->tokenizer_size, 512);
  EXPECT_EQ(info->bos_id, 2);
  EXPECT_FALSE(info->has_vision);
  ASSERT_EQ(info->tensors.size(), 106u);
  uint64_t bytes = 0;
  for (const TensorInfo& t : info->tensors) {
    EXPECT_EQ(t.type, "F32") << t.name;
    int64_t n = 1;
    for (int64_t d : t.shape) n *= d;
    EXPECT_EQ(t.bytes, static_cast<uint64_t>(n) * 4) << t.name;
    bytes += t.bytes;
  }
  EXPECT_EQ(bytes, 2865536u);
  EXPECT_EQ(info->weight_bytes, 2865536u);
}

// The plan inspect() gives equals the one Model::load checks and reports, field by field; at
// context 1024, chunk 256, bf16: a slot is K + V of 2 kv heads x 32 x 2 bytes = 256 B, the one
// global layer holds 1024 slots and each of the 7 local rings W + 256 - 1 = 263.
TEST(Inspect, MemoryPlanIsTheOneLoadUses) {
  PlanOptions po;
  po.context = 1024;
  po.prefill_chunk = 256;
  auto info = inspect(kTiny, po);
  ASSERT_TRUE(info.ok()) << info.status().to_string();
  const MemoryReport& m = info->memory;
  EXPECT_EQ(m.context, 1024);
  EXPECT_EQ(m.prefill_chunk, 256);
  EXPECT_EQ(m.kv_type, KvType::kBF16);
  EXPECT_EQ(m.kv_bytes_per_slot, 256u);
  EXPECT_EQ(m.kv_local_slots, 263);
  EXPECT_EQ(m.kv_global_bytes, 1024u * 256);
  EXPECT_EQ(m.kv_local_bytes, 7u * 263 * 256);
  EXPECT_EQ(m.kv_all_global_bytes, 8u * 1024 * 256);

  LoadOptions lo;
  lo.backend = BackendKind::kCpu;
  lo.context = 1024;
  lo.prefill_chunk = 256;
  auto model = Model::load(kTiny, lo);
  ASSERT_TRUE(model.ok()) << model.status().to_string();
  for (const MemoryReport& r : {(*model)->memory_plan(), (*model)->info().memory}) {
    EXPECT_EQ(r.weight_bytes, m.weight_bytes);
    EXPECT_EQ(r.kv_global_bytes, m.kv_global_bytes);
    EXPECT_EQ(r.kv_local_bytes, m.kv_local_bytes);
    EXPECT_EQ(r.scratch_bytes, m.scratch_bytes);
    EXPECT_EQ(r.kv_local_slots, m.kv_local_slots);
  }
  EXPECT_EQ((*model)->info().layer_pattern, info->layer_pattern);
  EXPECT_EQ((*model)->info().tensors.size(), info->tensors.size());

  po.context = 0;  // the model's maximum
  auto full = inspect(kTiny, po);
  ASSERT_TRUE(full.ok());
  EXPECT_EQ(full->memory.context, 4096);
}

TEST(Inspect, BadInputsNameTheProblem) {
  auto missing = inspect(testutil::data_path("no-such-model.gguf"));
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("no-such-model.gguf"), std::string::npos)
      << missing.status().message();
  PlanOptions po;
  po.context = 4097;
  auto too_long = inspect(kTiny, po);
  ASSERT_FALSE(too_long.ok());
  EXPECT_NE(too_long.status().message().find("PlanOptions::context"), std::string::npos)
      << too_long.status().message();
  po.context = 0;
  po.prefill_chunk = 0;
  auto no_chunk = inspect(kTiny, po);
  ASSERT_FALSE(no_chunk.ok());
  EXPECT_NE(no_chunk.status().message().find("PlanOptions::prefill_chunk"), std::string::npos)
      << no_chunk.status().message();
}

// The checkpoint's tokenizer without its weights encodes as the loaded model's does.
TEST(Inspect, TokenizerFromCheckpointIsTheModels) {
  auto tok = Tokenizer::from_checkpoint(kTiny);
  ASSERT_TRUE(tok.ok()) << tok.status().to_string();
  LoadOptions lo;
  lo.backend = BackendKind::kCpu;
  auto model = Model::load(kTiny, lo);
  ASSERT_TRUE(model.ok());
  const std::string text = "The quick brown fox <start_of_turn> jumps";
  for (bool special : {false, true}) {
    auto a = tok->encode(text, special), b = (*model)->tokenizer().encode(text, special);
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_EQ(*a, *b);
    EXPECT_FALSE(a->empty());
  }
  EXPECT_FALSE(Tokenizer::from_checkpoint(testutil::data_path("no-such-model.gguf")).ok());
}

TEST(Inspect, KvTypeNamesRoundTrip) {
  for (KvType t : {KvType::kBF16, KvType::kF32, KvType::kQ8_0, KvType::kF8})
    EXPECT_EQ(kv_type_from_name(kv_type_name(t)), t);
  EXPECT_FALSE(kv_type_from_name("f16").has_value());
}

}  // namespace
}  // namespace gemma3
