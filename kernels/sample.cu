// Token sampling on the device: the logits row never leaves the GPU. Greedy is an argmax;
// sampling sorts (key, id) pairs with CUB's radix sort and reduces softmax statistics, and the
// host (CudaBackend::sample) copies back only the few leading candidates it needs.
#include <cfloat>
#include <cub/device/device_radix_sort.cuh>

#include "common.cuh"

namespace gemma3::cuda {
namespace {

constexpr int kSampleThreads = 256;

// Workspace layout (each part 256-byte aligned): keys [n] f32, ids [n] i32, sorted keys [n],
// sorted ids [n], sums [kSampleStatBlocks] f64, counts [kSampleStatBlocks] i32, argmax values
// and ids [kSampleStatBlocks] each, then CUB's temporary storage.
struct Layout {
  size_t keys, ids, keys_s, ids_s, sums, counts, arg_v, arg_i, temp, temp_bytes, total;
};
size_t align256(size_t x) { return (x + 255) / 256 * 256; }
Layout layout(int n) {
  Layout l{};
  size_t at = 0;
  auto take = [&](size_t bytes) {
    const size_t p = at;
    at += align256(bytes);
    return p;
  };
  l.keys = take(sizeof(float) * n);
  l.ids = take(sizeof(int32_t) * n);
  l.keys_s = take(sizeof(float) * n);
  l.ids_s = take(sizeof(int32_t) * n);
  l.sums = take(sizeof(double) * kSampleStatBlocks);
  l.counts = take(sizeof(int) * kSampleStatBlocks);
  l.arg_v = take(sizeof(float) * kSampleStatBlocks);
  l.arg_i = take(sizeof(int32_t) * kSampleStatBlocks);
  // Size query only (null temp pointer): no device work, no stream.
  (void)cub::DeviceRadixSort::SortPairsDescending(
      nullptr, l.temp_bytes, static_cast<const float*>(nullptr), static_cast<float*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), n);
  l.temp = take(l.temp_bytes);
  l.total = at;
  return l;
}
template <class T>
T* at(const SampleArgs& a, size_t offset) {
  return reinterpret_cast<T*>(static_cast<uint8_t*>(a.workspace) + offset);
}

// NaN counts as -inf, as in sampler.cpp: it never wins the argmax and never reaches the sort
// (where its bits would order it first) or the softmax.
__device__ __forceinline__ float nan_to_minus_inf(float z) { return z != z ? -INFINITY : z; }

// keys[i] = z[i] = logits[i] (NaN -> -inf), ids[i] = i. Any 1-D grid.
__global__ void sample_keys_kernel(const float* logits, int n, float* keys, int32_t* ids) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    // + 0.0f turns -0 into +0 (and changes nothing else): the radix sort orders -0 below +0,
    // sampler.cpp's comparator treats them as equal (ties by id).
    keys[i] = __fadd_rn(nan_to_minus_inf(logits[i]), 0.0f);
    ids[i] = i;
  }
}

// The edited ids (unique, so no two threads write one key): bans -> -inf; penalized ids as
// sampler.cpp (divide positive logits, multiply negative ones; -inf and NaN stay -inf).
// Preconditions: any 1-D grid; run after sample_keys_kernel.
__global__ void sample_edit_kernel(const float* logits, const int32_t* edit_ids, int n_bans, int n_edits,
                                   int n, float penalty, float* keys) {
  for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < n_edits; e += gridDim.x * blockDim.x) {
    const int id = edit_ids[e];
    if (id < 0 || id >= n) continue;
    float z = -INFINITY;
    if (e >= n_bans) {
      z = nan_to_minus_inf(logits[id]);
      if (z != -INFINITY) z = z > 0 ? __fdiv_rn(z, penalty) : __fmul_rn(z, penalty);
    }
    keys[id] = __fadd_rn(z, 0.0f);  // -0 -> +0, as above
  }
}

// Temperature, in sampler.cpp's arithmetic: with mx = max z (from the argmax partials),
// key = float((double(z) - mx) / T), so the maximum is 0 and a tiny T cannot overflow z / T
// into inf - inf. -inf stays -inf (not a candidate); when mx = +inf only the +inf logits stay
// candidates, with key 0 (they share the probability). A candidate whose key overflows float
// becomes -FLT_MAX rather than -inf, so it still counts and sorts after every finite key, as
// the CPU's (x86) -inf candidate does. Preconditions: blockDim.x = kSampleThreads >= parts,
// any 1-D grid; run after argmax_partial_kernel over these keys.
__global__ void __launch_bounds__(kSampleThreads)
    sample_scale_kernel(float* keys, int n, const float* arg_v, int parts, float temperature) {
  __shared__ float scratch[32];
  const float mx = block_max(threadIdx.x < parts ? arg_v[threadIdx.x] : -INFINITY, scratch);
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const float z = keys[i];
    float k = -INFINITY;
    if (mx == INFINITY) {
      k = z == INFINITY ? 0.0f : -INFINITY;
    } else if (z != -INFINITY) {
      k = __double2float_rn(__ddiv_rn(__dsub_rn(z, mx), temperature));
      k = k == -INFINITY ? -FLT_MAX : __fadd_rn(k, 0.0f);  // -0 -> +0, as above
    }
    keys[i] = k;
  }
}

// (v, i) beats (w, j) when larger, or equal with a smaller index (first maximum wins).
__device__ __forceinline__ bool beats(float v, int i, float w, int j) { return v > w || (v == w && i < j); }

// Block tree reduction of (value, index) pairs to thread 0. blockDim.x = kSampleThreads.
__device__ void block_argmax(float* v, int* i) {
  __shared__ float sv[kSampleThreads];
  __shared__ int si[kSampleThreads];
  sv[threadIdx.x] = *v;
  si[threadIdx.x] = *i;
  __syncthreads();
  for (int s = kSampleThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s &&
        beats(sv[threadIdx.x + s], si[threadIdx.x + s], sv[threadIdx.x], si[threadIdx.x])) {
      sv[threadIdx.x] = sv[threadIdx.x + s];
      si[threadIdx.x] = si[threadIdx.x + s];
    }
    __syncthreads();
  }
  *v = sv[0];
  *i = si[0];
}

// Pass 1: block b's best over i = b * blockDim + t (grid-stride) -> (arg_v[b], arg_i[b]).
// Pass 2 (one block): the best of the partials -> *out. blockDim.x = kSampleThreads;
// pass 1 gridDim.x = kSampleStatBlocks. An index of INT_MAX marks "no element".
__global__ void __launch_bounds__(kSampleThreads)
    argmax_partial_kernel(const float* keys, int n, float* arg_v, int32_t* arg_i) {
  float best = -INFINITY;
  int bi = 0x7FFFFFFF;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    if (beats(keys[i], i, best, bi)) best = keys[i], bi = i;
  block_argmax(&best, &bi);
  if (threadIdx.x == 0) arg_v[blockIdx.x] = best, arg_i[blockIdx.x] = bi;
}
__global__ void __launch_bounds__(kSampleThreads)
    argmax_final_kernel(const float* arg_v, const int32_t* arg_i, int parts, int32_t* out) {
  float best = -INFINITY;
  int bi = 0x7FFFFFFF;
  for (int p = threadIdx.x; p < parts; p += blockDim.x)
    if (beats(arg_v[p], arg_i[p], best, bi)) best = arg_v[p], bi = arg_i[p];
  block_argmax(&best, &bi);
  // All keys -inf (or NaN): std::max_element would return the first index.
  if (threadIdx.x == 0) *out = bi == 0x7FFFFFFF ? 0 : bi;
}

// Softmax statistics of the sorted keys (see SampleSorted), each term as sampler.cpp's
// float(exp(double(key) - top)). gridDim.x = kSampleStatBlocks, blockDim.x = kSampleThreads;
// tree reductions, so the per-block results are deterministic.
__global__ void __launch_bounds__(kSampleThreads)
    sample_stats_kernel(const float* keys_s, int n, int limit, double* sums, int* counts) {
  __shared__ double ss[kSampleThreads];
  __shared__ int sc[kSampleThreads];
  const float mx = keys_s[0];
  double sum = 0;
  int count = 0;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const float k = keys_s[i];
    if (k == -INFINITY) continue;
    ++count;
    if (i < limit) sum += static_cast<double>(__double2float_rn(exp(static_cast<double>(k) - mx)));  // mx: 0
  }
  ss[threadIdx.x] = sum;
  sc[threadIdx.x] = count;
  __syncthreads();
  for (int s = kSampleThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      ss[threadIdx.x] += ss[threadIdx.x + s];
      sc[threadIdx.x] += sc[threadIdx.x + s];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) sums[blockIdx.x] = ss[0], counts[blockIdx.x] = sc[0];
}

// Shared first step: the keys with the edits applied.
int make_keys(const SampleArgs& a, cudaStream_t s, const Layout& l) {
  if (a.n < 1 || a.n_bans < 0 || a.n_edits < a.n_bans || (a.n_edits > 0 && !a.edit_ids) || !a.workspace ||
      a.workspace_bytes < l.total)
    return static_cast<int>(cudaErrorInvalidValue);
  const unsigned grid = grid_for(a.n, kSampleThreads);
  GEMMA3_LAUNCH(sample_keys_kernel, grid, kSampleThreads, 0, s, a.logits, a.n, at<float>(a, l.keys),
                at<int32_t>(a, l.ids));
  if (a.n_edits > 0)
    GEMMA3_LAUNCH(sample_edit_kernel, grid_for(a.n_edits, kSampleThreads), kSampleThreads, 0, s, a.logits,
                  a.edit_ids, a.n_bans, a.n_edits, a.n, a.penalty, at<float>(a, l.keys));
  return launch_result();
}

}  // namespace

size_t sample_workspace_bytes(int n) { return n < 1 ? 0 : layout(n).total; }

int launch_sample_argmax(const SampleArgs& a, int32_t* out_id, Stream stream) {
  const Layout l = layout(a.n > 0 ? a.n : 1);
  const cudaStream_t s = as_stream(stream);
  if (int rc = make_keys(a, s, l)) return rc;
  GEMMA3_LAUNCH(argmax_partial_kernel, kSampleStatBlocks, kSampleThreads, 0, s, at<float>(a, l.keys), a.n,
                at<float>(a, l.arg_v), at<int32_t>(a, l.arg_i));
  GEMMA3_LAUNCH(argmax_final_kernel, 1, kSampleThreads, 0, s, at<float>(a, l.arg_v), at<int32_t>(a, l.arg_i),
                kSampleStatBlocks, out_id);
  return launch_result();
}

int launch_sample_sort(const SampleArgs& a, SampleSorted* out, Stream stream) {
  const Layout l = layout(a.n > 0 ? a.n : 1);
  const cudaStream_t s = as_stream(stream);
  if (!(a.temperature > 0.0f)) return static_cast<int>(cudaErrorInvalidValue);  // greedy: the argmax
  if (int rc = make_keys(a, s, l)) return rc;
  // The maximum (argmax partials), then the keys scaled by the temperature against it.
  GEMMA3_LAUNCH(argmax_partial_kernel, kSampleStatBlocks, kSampleThreads, 0, s, at<float>(a, l.keys), a.n,
                at<float>(a, l.arg_v), at<int32_t>(a, l.arg_i));
  GEMMA3_LAUNCH(sample_scale_kernel, grid_for(a.n, kSampleThreads), kSampleThreads, 0, s,
                at<float>(a, l.keys), a.n, at<float>(a, l.arg_v), kSampleStatBlocks, a.temperature);
  size_t temp_bytes = l.temp_bytes;
  // Stable: equal keys keep the ascending id order of the input, as sampler.cpp's comparator.
  const cudaError_t e = cub::DeviceRadixSort::SortPairsDescending(
      at<void>(a, l.temp), temp_bytes, at<const float>(a, l.keys), at<float>(a, l.keys_s),
      at<const int32_t>(a, l.ids), at<int32_t>(a, l.ids_s), a.n, 0, 32, s);
  if (e != cudaSuccess) return static_cast<int>(e);
  const int limit = a.top_k > 0 && a.top_k < a.n ? a.top_k : a.n;
  GEMMA3_LAUNCH(sample_stats_kernel, kSampleStatBlocks, kSampleThreads, 0, s, at<float>(a, l.keys_s), a.n,
                limit, at<double>(a, l.sums), at<int>(a, l.counts));
  out->keys = at<float>(a, l.keys_s);
  out->ids = at<int32_t>(a, l.ids_s);
  out->sums = at<double>(a, l.sums);
  out->counts = at<int>(a, l.counts);
  return launch_result();
}

}  // namespace gemma3::cuda
