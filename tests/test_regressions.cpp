// One test per input that the fuzzers (fuzz/, docs/reliability.md) found crashing: the same bytes
// fed to the same entry point must now give an error Status (or a valid result), not a crash.
// The crashing inputs also live in fuzz/corpus/<target>/crash-*, so every fuzz run replays them.
#include <gtest/gtest.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>

#include "checkpoint/gguf.h"
#include "checkpoint/hf_config.h"
#include "checkpoint/safetensors.h"
#include "checkpoint/weights.h"

namespace gemma3 {
namespace {

namespace fs = std::filesystem;

std::string write_temp(const std::string& name, const std::string& bytes) {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  fs::path dir = fs::path(::testing::TempDir()) / (std::string("gemma3_regress_") + info->name());
  fs::create_directories(dir);
  const std::string path = (dir / name).string();
  std::ofstream(path, std::ios::binary) << bytes;
  return path;
}

// A safetensors file: u64 little-endian header length, the JSON header, then `data_bytes` zeros.
std::string safetensors_bytes(const std::string& header, size_t data_bytes) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(n >> (8 * i));
  return out + header + std::string(data_bytes, '\0');
}

// fuzz_safetensors: an F8_E4M3 weight whose last dimension is 0 made attach_fp8_scales call
// TensorView::rows() = numel / cols = 0 / 0 (SIGFPE; UBSan "division by zero" in tensor.h).
// Rows are now the product of the leading dimensions, so the scale is checked against 2 rows.
TEST(Regressions, SafetensorsFp8WeightWithZeroColumns) {
  const std::string per_tensor =
      write_temp("per_tensor.safetensors",
                 safetensors_bytes(R"({"w.weight":{"dtype":"F8_E4M3","shape":[2,0],"data_offsets":[0,0]},)"
                                   R"("w.weight_scale":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
                                   4));
  auto set = SafetensorsSet::open(per_tensor);
  ASSERT_TRUE(set.ok()) << set.status().to_string();
  const TensorView* w = set->find_tensor("w.weight");
  ASSERT_NE(w, nullptr);
  EXPECT_EQ(w->nbytes, 0u);
  ASSERT_EQ(w->row_scale.size(), 1u);
  EXPECT_EQ(w->row_scale[0], 0.0f);  // the scale's four zero bytes

  const std::string per_row =
      write_temp("per_row.safetensors",
                 safetensors_bytes(R"({"w.weight":{"dtype":"F8_E4M3","shape":[2,0],"data_offsets":[0,0]},)"
                                   R"("w.weight_scale":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                                   8));
  set = SafetensorsSet::open(per_row);
  ASSERT_TRUE(set.ok()) << set.status().to_string();
  EXPECT_EQ(set->find_tensor("w.weight")->row_scale.size(), 2u);

  // A scale for 3 rows does not fit a [2, 0] weight: the usual shape error, no crash.
  const std::string wrong =
      write_temp("wrong.safetensors",
                 safetensors_bytes(R"({"w.weight":{"dtype":"F8_E4M3","shape":[2,0],"data_offsets":[0,0]},)"
                                   R"("w.weight_scale":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}})",
                                   12));
  set = SafetensorsSet::open(wrong);
  ASSERT_FALSE(set.ok());
  EXPECT_EQ(set.status().code(), ErrorCode::kUnsupported) << set.status().to_string();
  EXPECT_NE(set.status().message().find("per-channel ([2] or [2, 1])"), std::string::npos)
      << set.status().message();
}

// The fuzzers only reach deep code (tensor binding, fp8 scale folding, sparse multimodal
// configs) if their seeds are valid inputs: check that the committed seeds load.
TEST(Regressions, FuzzSeedsAreValidInputs) {
  const fs::path corpus = fs::path(GEMMA3_SOURCE_DIR) / "fuzz/corpus";
  auto ck = Checkpoint::open((corpus / "gguf/micro_gemma3.gguf").string());
  ASSERT_TRUE(ck.ok()) << ck.status().to_string();
  EXPECT_EQ((*ck)->config().n_layers, 1);
  EXPECT_EQ((*ck)->tokenizer().n_vocab(), 10);
  auto all = GgufFile::open((corpus / "gguf/all_types.gguf").string());
  ASSERT_TRUE(all.ok()) << all.status().to_string();
  EXPECT_EQ(all->tensors().size(), 2u);
  for (const char* f : {"f32_bf16.safetensors", "fp8_channel.safetensors", "empty.safetensors"}) {
    auto set = SafetensorsSet::open((corpus / "safetensors" / f).string());
    EXPECT_TRUE(set.ok()) << f << ": " << set.status().to_string();
  }
  for (const char* f : {"tiny_config.json", "multimodal_sparse.json", "fp8_quantized.json"}) {
    auto c = load_hf_config((corpus / "hf_config" / f).string());
    EXPECT_TRUE(c.ok()) << f << ": " << c.status().to_string();
  }
  auto q = load_hf_quantization((corpus / "hf_config/fp8_quantized.json").string());
  ASSERT_TRUE(q.ok()) << q.status().to_string();
  EXPECT_EQ(q->kind, HfQuantKind::kFp8);
}

}  // namespace
}  // namespace gemma3
