// Row dequantization: weight tiles for the cuBLAS matmul path, and the embedding lookup.
#include "common.cuh"

namespace gemma3::cuda {
namespace {

// out[(r - row0) * cols + i] = W[r, i] * row_scale(r) for row0 <= r < row0 + n_rows, as fp32
// (Out = float) or rounded to bf16 bits (Out = uint16_t: the bf16 GEMM's tiles); D is the
// uploaded layout (dispatch_weight: Q4_0/Q8_0 planar).
// Preconditions: any grid/block shape (grid-stride loop over n_rows * cols elements).
template <class D, class Out>
__global__ void dequant_rows_kernel(WeightRef w, int64_t row0, int64_t n_rows, Out* out) {
  const int64_t total = n_rows * w.cols;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = row0 + idx / w.cols, i = idx % w.cols;
    const uint8_t* row = static_cast<const uint8_t*>(w.data) + r * w.row_bytes;
    const float v = blocks::mul(blocks::weight_value<D>(row, w.cols, i), row_scale_of(w, r));
    if constexpr (sizeof(Out) == 2)
      out[idx] = blocks::float_to_bf16(v);
    else
      out[idx] = v;
  }
}

// out[t, i] = (W[ids[t], i] * row_scale(ids[t])) * scale, the CPU reference's order.
// Preconditions: any 1-D grid (grid-stride loop over n * cols, so any n: a grid.y of tokens
// would stop at 65535); ids in [0, rows) (checked on the host by the caller).
template <class D>
__global__ void embed_kernel(WeightRef w, const int32_t* ids, int n, float scale, float* out) {
  const int64_t total = int64_t{n} * w.cols;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = ids[idx / w.cols], i = idx % w.cols;
    const uint8_t* row = static_cast<const uint8_t*>(w.data) + r * w.row_bytes;
    out[idx] = blocks::mul(blocks::mul(blocks::weight_value<D>(row, w.cols, i), row_scale_of(w, r)), scale);
  }
}

// Per-row fp8 quantization (launch_quantize_fp8_rows): one block per row (grid-stride over
// rows), amax by a block max, then each element divided by the row scale (correctly rounded,
// as the host reference x / scale) and encoded.
// Preconditions: blockDim.x = kQuantThreads (a multiple of 32), any gridDim.x.
constexpr int kQuantThreads = 256;
template <class D>
__global__ void __launch_bounds__(kQuantThreads)
    quantize_fp8_rows_kernel(WeightRef w, uint8_t* dst, float* scales) {
  __shared__ float scratch[32];
  for (int64_t r = blockIdx.x; r < w.rows; r += gridDim.x) {  // uniform over the block
    const uint8_t* row = static_cast<const uint8_t*>(w.data) + r * w.row_bytes;
    float amax = 0;
    for (int64_t i = threadIdx.x; i < w.cols; i += kQuantThreads)
      amax = fmaxf(amax, fabsf(blocks::row_value<D>(row, i)));
    amax = block_max(amax, scratch);
    const float s = amax > 0 ? blocks::div_rn(amax, 448.0f) : 1.0f;
    if (threadIdx.x == 0) scales[r] = s;
    for (int64_t i = threadIdx.x; i < w.cols; i += kQuantThreads)
      dst[r * w.cols + i] = blocks::float_to_e4m3(blocks::div_rn(blocks::row_value<D>(row, i), s));
  }
}

}  // namespace

int launch_quantize_fp8_rows(const WeightRef& w, uint8_t* dst, float* scales, Stream stream) {
  if (w.n_scales != 0 || w.rows < 0 || w.cols < 0) return static_cast<int>(cudaErrorInvalidValue);
  if (w.rows == 0 || w.cols == 0) return 0;
  const unsigned grid = static_cast<unsigned>(w.rows < 65535 * 16 ? w.rows : 65535 * 16);
  auto run = [&](auto d) {
    GEMMA3_LAUNCH(quantize_fp8_rows_kernel<decltype(d)>, grid, kQuantThreads, 0, as_stream(stream), w, dst,
                  scales);
    return launch_result();
  };
  switch (w.dtype) {
    case DType::kF32: return run(blocks::F32{});
    case DType::kF16: return run(blocks::F16{});
    case DType::kBF16: return run(blocks::BF16{});
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

namespace {
template <class Out>
int dequant_rows(const WeightRef& w, int64_t row0, int64_t n_rows, Out* out, Stream stream) {
  if (row0 < 0 || n_rows < 0 || row0 + n_rows > w.rows) return static_cast<int>(cudaErrorInvalidValue);
  if (n_rows == 0 || w.cols == 0) return 0;
  constexpr int kThreads = 256;
  return dispatch_weight(w.dtype, [&](auto d) {
    auto* const kernel = &dequant_rows_kernel<decltype(d), Out>;  // (the macro would split "<D, Out>")
    GEMMA3_LAUNCH(kernel, grid_for(n_rows * w.cols, kThreads), kThreads, 0, as_stream(stream), w, row0,
                  n_rows, out);
    return launch_result();
  });
}
}  // namespace

int launch_dequant_rows(const WeightRef& w, int64_t row0, int64_t n_rows, float* out, Stream stream) {
  return dequant_rows(w, row0, n_rows, out, stream);
}

int launch_dequant_rows_bf16(const WeightRef& w, int64_t row0, int64_t n_rows, uint16_t* out, Stream stream) {
  return dequant_rows(w, row0, n_rows, out, stream);
}

int launch_embed(const WeightRef& w, const int32_t* ids, int n, float scale, float* out, Stream stream) {
  if (n < 0) return static_cast<int>(cudaErrorInvalidValue);
  if (n == 0 || w.cols == 0) return 0;
  constexpr int kThreads = 256;
  return dispatch_weight(w.dtype, [&](auto d) {
    GEMMA3_LAUNCH(embed_kernel<decltype(d)>, grid_for(int64_t{n} * w.cols, kThreads), kThreads, 0,
                  as_stream(stream), w, ids, n, scale, out);
    return launch_result();
  });
}

}  // namespace gemma3::cuda
