// Matrix-vector products for decode and short chunks (n <= 8 tokens) with the dequantization
// fused in: the weight is read once, straight from its stored blocks.
//
// First version, written to be obviously right: one warp per output row, lanes striding over
// the row element by element (row_value<D> decodes one element, reloading its block's scales
// from L1). Known headroom: vectorized 16-byte loads per lane and decoding a lane's elements
// of one sub-block together (scales once); to be measured on the GPU first.
#include "common.cuh"

namespace gemma3::cuda {
namespace {

constexpr int kGemvWarps = 8;    // output rows per block
constexpr int kGemvTile = 1024;  // x columns staged per step: 8 tokens * 1024 * 4 B = 32 KiB
static_assert(kGemvTile % 256 == 0, "a tile must hold whole blocks of every type");

// out[t, o] = sum_i (W[o, i] * row_scale(o)) * x[t, i] for t < n, o < rows; one warp per row,
// x staged in shared memory tile by tile, fp32 accumulation.
// Preconditions: blockDim.x = 32 * kGemvWarps, gridDim.x = ceil(rows / kGemvWarps),
// 1 <= n <= kGemvMaxTokens.
template <class D>
__global__ void __launch_bounds__(32 * kGemvWarps)
    gemv_kernel(WeightRef w, const float* x, int n, float* out) {
  __shared__ float xs[kGemvMaxTokens * kGemvTile];  // [n, kGemvTile] slice of x
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t o = int64_t{blockIdx.x} * kGemvWarps + warp;
  const bool active = o < w.rows;  // whole warps only: the shuffle below needs all 32 lanes
  const uint8_t* row = static_cast<const uint8_t*>(w.data) + (active ? o : 0) * w.row_bytes;
  const float s = active ? row_scale_of(w, o) : 0.0f;
  float acc[kGemvMaxTokens] = {};
  for (int64_t k0 = 0; k0 < w.cols; k0 += kGemvTile) {
    const int len = static_cast<int>(w.cols - k0 < kGemvTile ? w.cols - k0 : kGemvTile);
    __syncthreads();  // every warp is done with the previous tile
    for (int idx = threadIdx.x; idx < n * len; idx += blockDim.x) {
      const int t = idx / len, c = idx % len;
      xs[t * kGemvTile + c] = x[t * w.cols + k0 + c];
    }
    __syncthreads();
    if (active) {
      for (int c = lane; c < len; c += 32) {
        const float wv = blocks::mul(blocks::row_value<D>(row, k0 + c), s);
#pragma unroll
        for (int t = 0; t < kGemvMaxTokens; ++t)
          if (t < n) acc[t] += wv * xs[t * kGemvTile + c];
      }
    }
  }
  if (active) {
#pragma unroll
    for (int t = 0; t < kGemvMaxTokens; ++t) {
      if (t < n) {
        const float v = warp_sum(acc[t]);
        if (lane == 0) out[t * w.rows + o] = v;
      }
    }
  }
}

}  // namespace

int launch_gemv(const WeightRef& w, const float* x, int n, float* out, Stream stream) {
  if (n < 1 || n > kGemvMaxTokens) return static_cast<int>(cudaErrorInvalidValue);
  if (w.rows == 0) return 0;
  const unsigned grid = static_cast<unsigned>((w.rows + kGemvWarps - 1) / kGemvWarps);
  return dispatch_dtype(w.dtype, [&](auto d) {
    GEMMA3_LAUNCH(gemv_kernel<decltype(d)>, grid, 32 * kGemvWarps, 0, as_stream(stream), w, x, n, out);
    return launch_result();
  });
}

}  // namespace gemma3::cuda
