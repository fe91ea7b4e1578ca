// Random-weight Gemma 3 checkpoints with the real shapes and metadata (`gemma3 make-model`).
//
// Output, by type:
//   F32 / BF16 / F16 / Q8_0 / Q4_0 / Q4_K: one GGUF laid out the way llama.cpp's converter (and,
//     for Q4_0 / Q4_K, llama-quantize or Google's QAT release) writes it (docs/formats.md §2.6-2.8,
//     §3.7, §6.2): gemma3.* keys, blk.N.* names, norms stored as 1 + w in F32, every 1-D tensor
//     F32, a synthesized SentencePiece vocabulary in tokenizer.ggml.*. With `vision`, the SigLIP
//     tower and projector go to a second file, the llama.cpp mmproj GGUF (§2.11).
//   F8E4M3: a Hugging Face folder in the compressed-tensors float-quantized layout (§5.2):
//     config.json with quantization_config, model.safetensors (sharded above max_shard_bytes)
//     with F8_E4M3 linear weights + per-row F32 `weight_scale` [rows, 1], BF16 norms (w, not
//     1 + w) and embedding, BF16 vision tower/projector (in `ignore`), and tokenizer.model.
//
// Weights are deterministic: every value is a function of (seed, tensor, row), so the same seed
// gives the same weights in every output type (the fp8 folder and the bf16 GGUF of one seed hold
// the same model up to rounding), and tensors are generated and quantized row block by row block
// inside the writer callback: a 27B file never sits in memory.
//
// Scales keep activations finite and non-degenerate through every layer: matrices ~ N(0, 1/fan_in)
// (unit-RMS inputs give unit-RMS outputs), embedding ~ N(0, 1/H) (so sqrt(H)-scaled embeddings
// and logits are O(1)), Gemma norm weights w ~ N(0, 0.05^2) (multiplier 1 + w), SigLIP
// LayerNorm weights 1 + N(0, 0.05^2) and biases N(0, 0.02^2).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "gemma3/status.h"
#include "model/config.h"

namespace gemma3 {

struct MakeModelOptions {
  std::string size = "tiny";  // "270m", "1b", "4b", "12b", "27b", "tiny"
  DType type = DType::kBF16;  // F32, BF16, F16, Q8_0, Q4_0, Q4_K (GGUF) or F8E4M3 (HF folder)
  bool vision = false;        // add the SigLIP tower + projector (4b/12b/27b/tiny only)
  uint64_t seed = 0;
  // Overrides of the size's defaults; 0 keeps the default.
  int layers = 0, hidden = 0, intermediate = 0, heads = 0, kv_heads = 0, head_dim = 0, vocab = 0, window = 0;
  // fp8 folder: shard model.safetensors when the tensor data exceeds this many bytes.
  uint64_t max_shard_bytes = uint64_t{4} << 30;
};

struct MakeModelProgress {
  uint64_t bytes_done = 0, bytes_total = 0;  // tensor data, over every output file
  std::string file;                          // file being written
  std::string tensor;                        // tensor being generated
};
using MakeModelProgressFn = std::function<void(const MakeModelProgress&)>;

// The text (and vision) configuration `options` describe, checked (sizes, heads dividing,
// vocabulary large enough for the synthesized special pieces).
Result<ModelConfig> make_model_config(const MakeModelOptions& options);

// Writes the checkpoint. `out_path`: the .gguf file (the mmproj goes to `out_path` with
// ".gguf" replaced by ".mmproj.gguf") or, for F8E4M3, the folder (created if needed).
Status make_model(const MakeModelOptions& options, const std::string& out_path,
                  const MakeModelProgressFn& progress = nullptr);

// Where make_model puts the mmproj GGUF for `out_path`: "x.gguf" -> "x.mmproj.gguf".
std::string make_model_mmproj_path(const std::string& out_path);

// The synthesized Gemma 3-like vocabulary of `n` pieces (n >= kMinVocab): <pad> <eos> <bos>
// <unk> <mask> [multimodal] <unused0..98>, <start_of_turn> 105, <end_of_turn> 106, "\n" 107,
// <0x00>..<0xFF> 108..363, then NORMAL filler pieces with unique texts and decreasing scores
// (printable ASCII, letter pairs, numbered pieces); <start_of_image> 255999 / <end_of_image>
// 256000 and <image_soft_token> 262144 when n reaches them. `gguf_types`: types as llama.cpp's
// converter writes them (specials CONTROL, see docs/formats.md §4.2); otherwise as the original
// tokenizer.model has them (pad/eos/bos CONTROL, unk UNKNOWN, other specials USER_DEFINED).
struct SynthVocab {
  std::vector<std::string> pieces;
  std::vector<float> scores;
  std::vector<int32_t> types;  // PieceType values
};
inline constexpr int kMakeModelMinVocab = 400;
SynthVocab make_synth_vocab(int n, bool gguf_types);

}  // namespace gemma3
