// The SigLIP vision tower and the Gemma 3 multimodal projector, written once over the backend
// op interface (docs/architecture.md §3.2, §3.3):
//
//   patches = im2col(pixels)                  [P, 3*p*p]   host, (c, ky, kx) order = Conv2d weight's
//   x = patches @ conv^T + conv_bias + pos    [P, Hv]      P = (S/p)^2 patches, row-major grid
//   per layer:  x += out(attn(LN1(x)))        full bidirectional attention, q/k/v/out with bias
//               x += fc2(gelu_tanh(fc1(LN2(x))))
//   x = post_LN(x)                            [P, Hv]      "tower" output
//   t = avg_pool_k(x)                         [N, Hv]      N = tokens_per_image, k = (S/p)/sqrt(N)
//   t = RMSNorm(t; 1 + w)                     Gemma convention, eps = the vision LayerNorm eps
//   out = t @ input_projection                [N, H]       the image's soft-token embeddings
//
// The tower's attention reuses the text model's attention op: K/V go into an fp32 KvLayer of
// P slots at positions 0..P-1, and the bidirectional range covers all of them (no RoPE).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "backend/backend.h"
#include "checkpoint/vision_weights.h"
#include "model/forward.h"

namespace gemma3 {

class VisionEncoder {
 public:
  ~VisionEncoder();
  VisionEncoder(const VisionEncoder&) = delete;
  VisionEncoder& operator=(const VisionEncoder&) = delete;

  // Uploads the weights (`w` must outlive the encoder). Activation buffers are allocated on the
  // first encode() and kept.
  static Result<std::unique_ptr<VisionEncoder>> create(Backend& backend, const VisionWeights& w);

  int image_size() const { return cfg_.image_size; }              // S: pixels per side
  int tokens_per_image() const { return cfg_.tokens_per_image; }  // N
  int text_hidden() const { return text_hidden_; }                // H

  // pixels: host [3, S, S] channels-first RGB, already normalized (image.h preprocess()).
  // out: host [N, H]. The hook (may be null) sees "vision_embed" [P, Hv], per layer
  // "vision_layer_out" [P, Hv], "vision_tower" [P, Hv], "vision_pooled" [N, Hv] and
  // "vision_projected" [N, H] (layer -1 except per-layer outputs).
  Status encode(const float* pixels, float* out, const ActivationHook* hook = nullptr);

 private:
  struct Layer {
    std::unique_ptr<BackendWeight> ln1_w, ln1_b, q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b, ln2_w, ln2_b, fc1_w,
        fc1_b, fc2_w, fc2_b;
  };
  explicit VisionEncoder(Backend& backend) : be_(backend) {}
  Status allocate();

  Backend& be_;
  VisionConfig cfg_;
  int text_hidden_ = 0;
  int side_ = 0;  // S / p: patches per side
  int pool_ = 0;  // k
  // Storage behind two uploaded views: the projection transposed to [H, Hv] fp32 (the matmul
  // op's [out, in]), and the patch Conv2d weight seen as [Hv, 3*p*p].
  std::vector<float> projection_t_;
  TensorView patch_view_, projection_view_;

  std::unique_ptr<BackendWeight> patch_w_, patch_b_, position_, post_ln_w_, post_ln_b_, soft_norm_,
      projection_;
  std::vector<Layer> layers_;

  // Backend buffers (P = side_^2 patches).
  std::vector<void*> owned_;
  float* patches_ = nullptr;           // [P, 3*p*p]
  float* x_ = nullptr;                 // [P, Hv] residual stream
  float* normed_ = nullptr;            // [P, Hv]
  float* q_ = nullptr;                 // [P, Hv]
  float* k_ = nullptr;                 // [P, Hv]
  float* v_ = nullptr;                 // [P, Hv]
  float* attn_ = nullptr;              // [P, Hv]
  float* mlp_ = nullptr;               // [P, Iv]
  float* pooled_ = nullptr;            // [N, Hv]
  float* out_ = nullptr;               // [N, H]
  KvLayer kv_;                         // k_ and v_ as fp32 K/V slots [P, Hv] (no copy)
  std::vector<int32_t> position_ids_;  // host [P]: 0..P-1
  std::vector<float> host_patches_;    // host [P, 3*p*p]
};

}  // namespace gemma3
