// Host launchers of the vision-tower kernels (kernels/vision.cu), declared without CUDA types
// (same conventions as launch.h: device pointers, `stream` a cudaStream_t, a cudaError_t as int).
#pragma once

#include <cstdint>

#include "launch.h"

namespace gemma3::cuda {

// out[r, :] = (x[r, :] - mean) / sqrt(var + eps) * w + b over rows of dim (biased variance,
// torch.nn.LayerNorm in fp32); w, b [dim] fp32. In place allowed.
int launch_layernorm(const float* x, const float* w, const float* b, int64_t rows, int dim, float eps,
                     float* out, Stream stream);
// x += a, then out = layernorm(x) as launch_layernorm, in one pass (Backend::add_layernorm).
// out may alias a or x.
int launch_add_layernorm(const float* a, float* x, const float* w, const float* b, int64_t rows, int dim,
                         float eps, float* out, Stream stream);
// out[r, i] = x[r, i] + b[i], x/out [rows, dim], b [dim] fp32. In place allowed.
int launch_add_bias(const float* x, const float* b, int64_t rows, int dim, float* out, Stream stream);
// out[i] = gelu_tanh(x[i]) over n values. In place allowed.
int launch_gelu(const float* x, int64_t n, float* out, Stream stream);
// k x k average pooling (stride k) of a side x side grid of dim-wide rows: x [side^2, dim] ->
// out [(side/k)^2, dim] (backend.h Backend::avg_pool). side % k == 0; out must not alias x.
int launch_avg_pool(const float* x, int side, int dim, int k, float* out, Stream stream);

}  // namespace gemma3::cuda
