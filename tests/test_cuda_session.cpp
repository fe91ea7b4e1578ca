// The decode step through the public API: generate samples each token on the backend
// (Backend::sample) and leaves the logits there; last_logits() copies them on demand.
//   DecodeOnDevice.*  CPU backend, every build.
//   CudaSession.*     the CUDA backend (a GPU, or the emulator in the debug build); skipped
//                     with a message when there is none.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "backend/backend.h"
#include "gemma3/engine.h"
#include "gemma3/gemma3.h"
#include "runtime/kv_cache.h"
#include "test_util.h"

namespace gemma3 {
namespace {

std::string tiny_path() {
  // tools/gpu-check.sh runs prebuilt binaries in another copy of the tree: it points here.
  const char* root = std::getenv("GEMMA3_SOURCE_DIR");
  return std::string(root && *root ? root : GEMMA3_SOURCE_DIR) + "/tests/data/tiny-f32.gguf";
}

std::shared_ptr<Model> load_tiny(BackendKind backend, int context = 64) {
  LoadOptions lo;
  lo.backend = backend;
  lo.threads = 2;
  lo.kv_type = KvType::kF32;
  lo.context = context;
  auto m = Model::load(tiny_path(), lo);
  EXPECT_TRUE(m.ok()) << m.status().to_string();
  return m.ok() ? *m : nullptr;
}

// <bos>, <start_of_turn>, fillers: 12 tokens, past the tiny model's window of 8.
const std::vector<int32_t> kPrompt = {2, 105, 370, 371, 400, 107, 200, 380, 390, 107, 106, 375};

struct Generated {
  std::vector<int32_t> context;  // prompt + every token generate fed back
  std::vector<float> last_logits;
};

Generated generate_on(Model& m, const SamplingOptions& sampling, int max_tokens) {
  Generated g;
  auto s = m.new_session();
  EXPECT_TRUE(s.ok()) << s.status().to_string();
  if (!s.ok()) return g;
  EXPECT_TRUE((*s)->feed_tokens(kPrompt).ok());
  GenerateOptions o;
  o.max_tokens = max_tokens;
  o.sampling = sampling;
  const Status st = (*s)->generate(o, [](const TokenEvent&) { return true; }).status();
  EXPECT_TRUE(st.ok()) << st.to_string();
  g.context = (*s)->tokens();
  g.last_logits = testutil::to_vector((*s)->last_logits());
  return g;
}

// The logits after feeding the prompt, then each later token of `context` one at a time.
std::vector<float> replay(Model& m, const std::vector<int32_t>& context) {
  auto s = m.new_session();
  EXPECT_TRUE(s.ok());
  if (!s.ok()) return {};
  EXPECT_TRUE((*s)->feed_tokens(kPrompt).ok());
  for (size_t i = kPrompt.size(); i < context.size(); ++i) EXPECT_TRUE((*s)->feed_tokens({context[i]}).ok());
  return testutil::to_vector((*s)->last_logits());
}

// After generate, last_logits() are those of the last token it fed back: the same as feeding
// the prompt and then the generated tokens one at a time (the same forward path, so bit for
// bit). A stale host copy (the prompt's logits) or a wrong device row fails.
TEST(DecodeOnDevice, LastLogitsAfterGenerateAreThoseOfTheLastFedToken) {
  auto m = load_tiny(BackendKind::kCpu);
  ASSERT_TRUE(m);
  for (float temperature : {0.0f, 0.9f}) {
    SamplingOptions so;
    so.temperature = temperature;
    so.seed = 11;
    const Generated g = generate_on(*m, so, 9);
    ASSERT_GT(g.context.size(), kPrompt.size()) << "generate fed back no token";
    EXPECT_EQ(g.last_logits, replay(*m, g.context)) << "temperature " << temperature;
    EXPECT_NE(g.last_logits, replay(*m, kPrompt));
    // Same seed, same tokens; the stream of seeds restarts with every generate call.
    EXPECT_EQ(generate_on(*m, so, 9).context, g.context);
  }
}

// A session saved after generate stores the logits of its last token, not the stale prompt's.
TEST(DecodeOnDevice, SavedStateHoldsTheLogitsAfterGenerate) {
  auto m = load_tiny(BackendKind::kCpu);
  ASSERT_TRUE(m);
  auto s = m->new_session();
  ASSERT_TRUE(s.ok());
  ASSERT_TRUE((*s)->feed_tokens(kPrompt).ok());
  GenerateOptions o;
  o.max_tokens = 5;
  ASSERT_TRUE((*s)->generate(o, [](const TokenEvent&) { return true; }).ok());
  const std::string path = ::testing::TempDir() + "decode_on_device.state";
  ASSERT_TRUE((*s)->save_state(path).ok());
  const std::vector<float> want = replay(*m, (*s)->tokens());
  auto r = m->new_session();
  ASSERT_TRUE(r.ok());
  ASSERT_TRUE((*r)->load_state(path).ok());
  EXPECT_EQ(testutil::to_vector((*r)->last_logits()), want);
  std::remove(path.c_str());
}

// Greedy generate on the CUDA backend (token picked on the device, logits never copied during
// decode) gives the CPU's tokens, and last_logits() after it matches the CPU's within the
// fp32 tolerance of CudaOps.TinyModelMatchesCpu when the prompt's attention is the fp32 kernel
// (GEMMA3_CUDA_FLASH=0; the tiny model's weights are F32, so its GEMMs are fp32 too), and within
// that test's allowance for the tensor-core attention (bf16 q, K, V, P) by default.
TEST(CudaSession, GreedyGenerateMatchesCpu) {
  if (!cuda_backend_available()) GTEST_SKIP() << "no CUDA device here (nor the emulator build)";
  auto cm = load_tiny(BackendKind::kCpu);
  ASSERT_TRUE(cm);
  SamplingOptions greedy;
  const Generated c = generate_on(*cm, greedy, 8);
  for (const bool flash : {false, true}) {
    if (!flash) setenv("GEMMA3_CUDA_FLASH", "0", 1);
    auto gm = load_tiny(BackendKind::kCuda);
    unsetenv("GEMMA3_CUDA_FLASH");
    ASSERT_TRUE(gm);
    const Generated g = generate_on(*gm, greedy, 8);
    EXPECT_EQ(g.context, c.context) << (flash ? "tensor-core" : "fp32") << " attention";
    ASSERT_EQ(g.last_logits.size(), c.last_logits.size());
    double err = 0, mag = 1;
    for (size_t i = 0; i < c.last_logits.size(); ++i) {
      err = std::max(err, std::fabs(double(g.last_logits[i]) - c.last_logits[i]));
      mag = std::max(mag, std::fabs(double(c.last_logits[i])));
    }
    EXPECT_LT(err / mag, flash ? 3e-2 : 1e-4) << (flash ? "tensor-core" : "fp32") << " attention";
  }
}

// Decode steps as recorded steps (CUDA graphs, replayed with the position read from device
// memory) give the tokens and logits of the same steps run op by op (GEMMA3_CUDA_GRAPHS=0) and
// the CPU's greedy tokens, across position buckets: the prompt ends at 60, so decode crosses
// 64, where the attention splits are planned anew for the bucket up to 128.
TEST(CudaSession, RecordedDecodeMatchesDirectAcrossBuckets) {
  if (!cuda_backend_available()) GTEST_SKIP() << "no CUDA device here (nor the emulator build)";
  std::vector<int32_t> prompt = kPrompt;
  for (int i = 0; prompt.size() < 60; ++i) prompt.push_back(300 + (i * 37) % 200);
  auto run = [&](BackendKind backend, bool graphs) {
    if (!graphs) setenv("GEMMA3_CUDA_GRAPHS", "0", 1);
    auto m = load_tiny(backend, 200);
    unsetenv("GEMMA3_CUDA_GRAPHS");
    Generated g;
    if (!m) return g;
    auto s = m->new_session();
    EXPECT_TRUE(s.ok());
    if (!s.ok()) return g;
    EXPECT_TRUE((*s)->feed_tokens(prompt).ok());
    GenerateOptions o;
    o.max_tokens = 12;
    const Status st = (*s)->generate(o, [](const TokenEvent&) { return true; }).status();
    EXPECT_TRUE(st.ok()) << st.to_string();
    g.context = (*s)->tokens();
    g.last_logits = testutil::to_vector((*s)->last_logits());
    return g;
  };
  const Generated recorded = run(BackendKind::kCuda, true), direct = run(BackendKind::kCuda, false),
                  cpu = run(BackendKind::kCpu, true);
  ASSERT_GT(recorded.context.size(), 64u);
  EXPECT_EQ(recorded.context, direct.context);
  EXPECT_EQ(recorded.context, cpu.context);
  ASSERT_EQ(recorded.last_logits.size(), direct.last_logits.size());
  double err = 0, mag = 1;
  for (size_t i = 0; i < direct.last_logits.size(); ++i) {
    err = std::max(err, std::fabs(double(recorded.last_logits[i]) - direct.last_logits[i]));
    mag = std::max(mag, std::fabs(double(direct.last_logits[i])));
  }
  EXPECT_LT(err / mag, 1e-5);  // the same kernels; only the split of the keys may differ
}

// The Engine's batched steps on the CUDA backend (forward_batch: several sequences' rows in one
// matmul, attention per sequence, one embed for the step): 4 requests decoded together give
// the greedy tokens of lone CPU sessions.
// Four requests of 7-13 prompt tokens and 8 greedy tokens each, submitted at once from four
// threads to an Engine on `gm`, against a CPU Session each.
void expect_engine_matches_cpu(const std::shared_ptr<Model>& gm, const std::shared_ptr<Model>& cm,
                               const EngineOptions& eo, EngineStats* stats = nullptr) {
  std::vector<std::vector<int32_t>> prompts;
  for (int r = 0; r < 4; ++r) {
    std::vector<int32_t> p = kPrompt;
    p.resize(kPrompt.size() - 2 * r);  // 12, 10, 8, 6 tokens
    p.push_back(380 + r);
    prompts.push_back(p);
  }
  auto e = Engine::create(gm, eo);
  ASSERT_TRUE(e.ok()) << e.status().to_string();
  std::vector<std::vector<int32_t>> got(prompts.size());
  std::vector<std::thread> threads;
  for (size_t r = 0; r < prompts.size(); ++r)
    threads.emplace_back([&, r] {
      EngineRequest req;
      req.tokens = prompts[r];
      req.options.max_tokens = 8;
      req.options.ignore_eos = true;
      const auto res = (*e)->generate(req, [&](const TokenEvent& ev) {
        if (ev.id >= 0) got[r].push_back(ev.id);
        return true;
      });
      EXPECT_TRUE(res.ok()) << res.status().to_string();
    });
  for (auto& t : threads) t.join();
  if (stats) *stats = (*e)->stats();
  for (size_t r = 0; r < prompts.size(); ++r) {
    auto s = cm->new_session().value();
    ASSERT_TRUE(s->feed_tokens(prompts[r]).ok());
    GenerateOptions o;
    o.max_tokens = 8;
    o.ignore_eos = true;
    std::vector<int32_t> want;
    ASSERT_TRUE(s->generate(o, [&](const TokenEvent& ev) {
                   if (ev.id >= 0) want.push_back(ev.id);
                   return true;
                 }).ok());
    EXPECT_EQ(got[r], want) << "request " << r;
  }
}

TEST(CudaSession, EngineBatchMatchesCpuGreedy) {
  if (!cuda_backend_available()) GTEST_SKIP() << "no CUDA device here (nor the emulator build)";
  auto cm = load_tiny(BackendKind::kCpu);
  auto gm = load_tiny(BackendKind::kCuda);
  ASSERT_TRUE(cm && gm);
  EngineOptions eo;
  eo.max_sequences = 4;
  expect_engine_matches_cpu(gm, cm, eo);
}

// The tiny model's global layer: one position's K (or V) is 2 kv heads x 32 fp32 values.
constexpr size_t kTinyRowBytes = 2 * 32 * 4;

// An Engine on the CUDA backend with its global KV mapped page by page (the driver's virtual
// memory; tools/cuda-emu emulates it) and a pool of one context: the requests cross pages while
// decoding, wait for pages and may be preempted, and still give the CPU's greedy tokens.
TEST(CudaSession, EnginePagedKvMatchesCpuGreedy) {
  if (!cuda_backend_available()) GTEST_SKIP() << "no CUDA device here (nor the emulator build)";
  // The emulator maps 2 MiB at a time as a GPU does: 8192 positions of the tiny model's rows,
  // more than its context. 4 KiB makes pages of 16 positions there (a GPU ignores the variable).
  setenv("GEMMA3_CUDA_EMU_VMM_GRANULARITY", "4096", 1);
  auto probe = make_cuda_backend({});
  ASSERT_TRUE(probe.ok()) << probe.status().to_string();
  const size_t gran = (*probe)->map_granularity();
  probe->reset();
  if (gran == 0) GTEST_SKIP() << "this CUDA backend maps no memory on demand (no driver VMM)";
  const size_t page_tokens = gran / kTinyRowBytes;
  if (page_tokens > 16)
    GTEST_SKIP()
        << "the device maps " << gran << " bytes at a time: pages of " << page_tokens
        << " positions, longer than this test's requests (CudaSession.KvPagesAreMappedOnDemand covers it)";
  auto cm = load_tiny(BackendKind::kCpu);
  auto gm = load_tiny(BackendKind::kCuda);
  ASSERT_TRUE(cm && gm);
  EngineOptions eo;
  eo.max_sequences = 4;
  eo.kv_tokens = 64;  // the whole context: 4 pages for four requests of up to 21 positions
  EngineStats st;
  expect_engine_matches_cpu(gm, cm, eo, &st);
  EXPECT_EQ(st.kv_page_tokens, 16);
  EXPECT_EQ(st.kv_pages, 4);
}

// KvCache on the CUDA backend, paged: memory exists only behind mapped pages (free device
// memory drops by them), a page mapped again reads as zeros, the pages kept keep their bytes,
// and ranges across pages copy as one (the mappings are contiguous in the address space).
TEST(CudaSession, KvPagesAreMappedOnDemand) {
  if (!cuda_backend_available()) GTEST_SKIP() << "no CUDA device here (nor the emulator build)";
  setenv("GEMMA3_CUDA_EMU_VMM_GRANULARITY", "4096", 1);  // the emulator's; a GPU ignores it
  auto made = make_cuda_backend({});
  ASSERT_TRUE(made.ok()) << made.status().to_string();
  Backend& be = **made;
  const size_t gran = be.map_granularity();
  ASSERT_GT(gran, 0u) << "the CUDA backend maps no memory on demand (driver VMM entry points missing)";
  ModelConfig c;
  c.n_layers = 3;
  c.hidden = 64;
  c.n_heads = 2;
  c.n_kv_heads = 2;
  c.head_dim = 32;
  c.sliding_window = 8;
  c.vocab_size = 100;
  c.set_layer_pattern(3);         // layer 2 global
  const size_t row = 2 * 32 * 2;  // bf16
  const int page = static_cast<int>(gran / row), context = 3 * page - 5;
  c.max_context = context;
  const KvPlan plan = plan_kv(c, context, 16, DType::kBF16, gran);
  ASSERT_EQ(plan.page_tokens, page);
  KvCache cache(be, plan);
  ASSERT_TRUE(cache.allocate(c, /*paged=*/true).ok());
  EXPECT_EQ(cache.allocated_global_bytes(), 0u);
  const uint64_t free0 = be.free_bytes();
  ASSERT_TRUE(cache.map_pages(2).ok());
  EXPECT_EQ(cache.allocated_global_bytes(), 2 * plan.page_bytes);
  EXPECT_LE(be.free_bytes() + 2 * plan.page_bytes, free0) << "mapping two pages took no device memory";
  const KvLayer& g = cache.layer(2);
  const size_t page_bytes = page * row;
  std::vector<uint8_t> bytes(2 * page_bytes, 0x5a), back(2 * page_bytes);
  be.from_host(bytes.data(), g.k, bytes.size());
  be.copy(g.k, g.v, bytes.size());  // across the two pages
  cache.unmap_pages_from(1);
  EXPECT_EQ(cache.mapped_pages(), 1);
  ASSERT_TRUE(cache.map_pages(2).ok());
  be.to_host(g.v, back.data(), back.size());
  EXPECT_TRUE(std::all_of(back.begin(), back.begin() + page_bytes, [](uint8_t b) { return b == 0x5a; }))
      << "page 0 lost its bytes";
  EXPECT_TRUE(std::all_of(back.begin() + page_bytes, back.end(), [](uint8_t b) { return b == 0; }))
      << "page 1 does not read as zeros after it was mapped again";
  ASSERT_TRUE(cache.map_pages(1000).ok());  // clamped to the context's 3 pages
  EXPECT_EQ(cache.mapped_pages(), 3);
  std::vector<uint8_t> all(3 * page_bytes, 7);
  be.from_host(all.data(), g.k, all.size());  // the last page maps whole, past the context
  cache.unmap_pages_from(0);
  EXPECT_EQ(cache.allocated_global_bytes(), 0u);
  EXPECT_TRUE(cuda_backend_status(be).ok()) << cuda_backend_status(be).to_string();
  {  // Q8_0 rows (2 x 34 bytes) fill whole granules only every (granularity / 4) positions: a
     // layer's reservation (whole pages) is then more than its context's bytes rounded up to
     // granules, and the cache must give back exactly what it reserved (on a GPU, 2 MiB
     // granules make such pages longer than this context: not paged)
    const KvPlan q8 = plan_kv(c, 1500, 16, DType::kQ8_0, gran);
    KvCache qc(be, q8);
    ASSERT_TRUE(qc.allocate(c, /*paged=*/true).ok());
    ASSERT_TRUE(qc.map_pages(1).ok());
  }
  EXPECT_TRUE(cuda_backend_status(be).ok()) << cuda_backend_status(be).to_string();
}

// The bench's roofline: a copy in backend memory, measured, positive; the model still works
// afterwards (the CUDA buffers are freed, no error is left behind).
TEST(CudaSession, CopyBandwidthIsMeasuredAndLeavesNoError) {
  if (!cuda_backend_available()) GTEST_SKIP() << "no CUDA device here (nor the emulator build)";
  auto m = load_tiny(BackendKind::kCuda);
  ASSERT_TRUE(m);
  EXPECT_GT(m->copy_bandwidth(), 1e6);
  SamplingOptions greedy;
  EXPECT_GT(generate_on(*m, greedy, 2).context.size(), kPrompt.size());
}

// The bench's compute roofline: a bf16 GEMM on cuBLAS (the emulator's reference loops here),
// measured, positive, leaving no error; the CPU has none and says 0.
TEST(CudaSession, GemmRateIsMeasuredAndLeavesNoError) {
  if (!cuda_backend_available()) GTEST_SKIP() << "no CUDA device here (nor the emulator build)";
  auto m = load_tiny(BackendKind::kCuda);
  ASSERT_TRUE(m);
  EXPECT_GT(m->gemm_rate(16, 48, 64), 0);
  EXPECT_EQ(m->gemm_rate(0, 48, 64), 0);
  SamplingOptions greedy;
  EXPECT_GT(generate_on(*m, greedy, 2).context.size(), kPrompt.size());
  auto c = load_tiny(BackendKind::kCpu);
  ASSERT_TRUE(c);
  EXPECT_EQ(c->gemm_rate(16, 48, 64), 0);
}

TEST(DecodeOnDevice, CpuCopyBandwidthIsMeasured) {
  auto m = load_tiny(BackendKind::kCpu);
  ASSERT_TRUE(m);
  EXPECT_GT(m->copy_bandwidth(), 1e6);
}

}  // namespace
}  // namespace gemma3
