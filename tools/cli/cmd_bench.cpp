// gemma3 bench: prompt-processing and generation speed, measured the way llama.cpp's
// llama-bench measures them so the two can be put side by side (tools/bench/compare-llamacpp.sh):
//
//  * ppN: a fresh context (after -d DEPTH untimed tokens), N random token ids fed as one
//    prompt; tokens/s = N / time. -d takes a list (-d 0,8192,32768): every test runs at each
//    depth. The DEPTH tokens are prefilled once per depth and the session state is saved, then
//    restored before each run (Session::save_state/load_state), as llama-bench keeps the depth
//    prefix and only drops what a test added.
//  * tgN: a fresh context (after DEPTH), N tokens fed one at a time, each computing the logits
//    of its position (as llama-bench's test_gen does); tokens/s = N / time.
//  * one untimed warm-up run of each test, then -r repetitions: mean and sample stddev of the
//    per-repetition tokens/s.
//
// For tg the table also shows the weight bytes one token reads (every text tensor, the tied
// embedding counted once: the LM head reads the whole table), the bandwidth that implies, and
// that bandwidth as a share of a copy measured in the same run on the same backend
// (Model::copy_bandwidth: bytes read + written per second by a large memcpy on every thread,
// or a device-to-device copy on a GPU): the memory roofline decode is held to. For pp it shows
// the model FLOPs per second (prefill_flops) and, on a GPU, that rate as a share of a cuBLAS
// bf16 GEMM timed in the same run with the shape of one prefill chunk's gate|up projection
// (Model::gemm_rate): the compute roofline prefill is held to.
//
// --parallel N[,N...] measures many sequences at once instead, as llama.cpp's
// llama-batched-bench does (-npp P -ntg T -npl N): an Engine with N sequences takes N requests
// of P random tokens at once, prefills them in one step, then decodes T more tokens for each,
// one token of every sequence per step. Aggregate pp t/s = N * P / (time until every request
// has its first token); aggregate tg t/s = N * T / (the rest). End-of-text ids do not stop the
// requests (GenerateOptions::ignore_eos), so every run has the same length.
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>
#include <vector>

#include "cli_common.h"
#include "commands.h"
#include "gemma3/engine.h"

namespace gemma3::cli {

namespace {

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct Spread {
  double mean = 0, stddev = 0;
};
Spread spread(const std::vector<double>& v) {
  Spread s;
  if (v.empty()) return s;
  for (double x : v) s.mean += x;
  s.mean /= static_cast<double>(v.size());
  if (v.size() > 1) {
    double ss = 0;
    for (double x : v) ss += (x - s.mean) * (x - s.mean);
    s.stddev = std::sqrt(ss / static_cast<double>(v.size() - 1));
  }
  return s;
}

// FLOPs (2 per multiply-add) of feeding n tokens after `depth` tokens: each layer's projections
// (q, k, v, o) and MLP (gate, up, down) for every token, attention scores and values over the
// keys each query sees (the window on sliding layers), and the LM head for the last token.
double prefill_flops(const ModelInfo& c, int n, int depth) {
  const double H = c.hidden, qw = double(c.n_heads) * c.head_dim, kvw = double(c.n_kv_heads) * c.head_dim;
  const double per_token = 2.0 * (H * (qw + 2 * kvw) + qw * H + 3.0 * H * c.intermediate);
  double flops = per_token * c.n_layers * n + 2.0 * H * c.vocab_size;
  for (int l = 0; l < c.n_layers; ++l)
    for (int i = 0; i < n; ++i) {
      const double keys = depth + i + 1;
      flops += 4.0 * qw * (c.layer_pattern[l] == 'G' ? keys : std::min<double>(keys, c.sliding_window));
    }
  return flops;
}

struct ParallelRun {
  double pp_tps = 0, tg_tps = 0;
};

// One --parallel run: n requests of `prompt` random ids each, `gen` decode steps after the
// prefill step (max_tokens gen + 1: the first token comes from the prefill).
Result<ParallelRun> run_parallel(Engine& engine, int n, int prompt, int gen, std::mt19937& rng, int vocab) {
  std::uniform_int_distribution<int32_t> tok(0, vocab - 1);
  std::mutex mu;
  std::condition_variable cv;
  int first = 0, done = 0;
  double t_first = 0, t_done = 0;
  Status error;
  const double t0 = now_seconds();
  for (int i = 0; i < n; ++i) {
    EngineRequest r;
    r.tokens.resize(prompt);
    for (int32_t& x : r.tokens) x = tok(rng);
    r.options.max_tokens = gen + 1;
    r.options.ignore_eos = true;
    auto seen = std::make_shared<bool>(false);
    GEMMA3_TRY(engine
                   .submit(
                       std::move(r),
                       [&, seen](const TokenEvent&) {
                         if (*seen) return true;
                         *seen = true;
                         std::lock_guard<std::mutex> lock(mu);
                         ++first;
                         t_first = now_seconds();
                         return true;
                       },
                       [&](const Result<GenerateResult>& res) {
                         std::lock_guard<std::mutex> lock(mu);
                         if (!res.ok() && error.ok()) error = res.status();
                         ++done;
                         t_done = now_seconds();
                         cv.notify_all();
                       })
                   .status());
  }
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return done == n; });
  GEMMA3_TRY(error);
  if (first != n)
    return internal_error(fmt::format("bench: {} of {} requests streamed a first token", first, n));
  ParallelRun out;
  out.pp_tps = double(n) * prompt / (t_first - t0);
  out.tg_tps = gen > 0 ? double(n) * gen / (t_done - t_first) : 0;
  return out;
}

int bench_parallel(const std::shared_ptr<Model>& model, const std::vector<int>& ns, int prompt, int gen,
                   int reps, int threads, const std::string& output, const std::string& model_path) {
  std::mt19937 rng(1234);
  struct Row {
    int n;
    std::vector<double> pp, tg;
  };
  std::vector<Row> rows;
  for (const int n : ns) {
    EngineOptions eo;
    eo.max_sequences = n;
    eo.context = prompt + gen + 1;
    eo.step_tokens = std::max(n * prompt, n);  // every prompt in one step, as llama-batched-bench
    auto engine = Engine::create(model, eo);
    if (!engine.ok()) return fail("bench", engine.status());
    Row row{n, {}, {}};
    for (int rep = -1; rep < reps; ++rep) {  // rep -1: warm-up
      auto r = run_parallel(**engine, n, prompt, gen, rng, model->tokenizer().n_vocab());
      if (!r.ok()) return fail("bench", r.status());
      if (rep < 0) continue;
      row.pp.push_back(r->pp_tps);
      row.tg.push_back(r->tg_tps);
    }
    rows.push_back(std::move(row));
  }
  if (output == "json") {
    nlohmann::json out = nlohmann::json::array();
    for (const Row& r : rows) {
      const Spread pp = spread(r.pp), tg = spread(r.tg);
      out.push_back({{"model", model_path},
                     {"threads", threads},
                     {"test", "parallel"},
                     {"n_parallel", r.n},
                     {"n_prompt", prompt},
                     {"n_gen", gen},
                     {"pp_samples_ts", r.pp},
                     {"tg_samples_ts", r.tg},
                     {"pp_avg_ts", pp.mean},
                     {"pp_stddev_ts", pp.stddev},
                     {"tg_avg_ts", tg.mean},
                     {"tg_stddev_ts", tg.stddev}});
    }
    std::printf("%s\n", out.dump(2).c_str());
    return kExitOk;
  }
  std::printf(
      "| model | threads | sequences | prompt | gen | pp t/s (all) | tg t/s (all) | tg t/s (each) |\n");
  std::printf(
      "| ----- | ------: | --------: | -----: | --: | -----------: | -----------: | ------------: |\n");
  for (const Row& r : rows) {
    const Spread pp = spread(r.pp), tg = spread(r.tg);
    std::printf("| gemma3 %s | %d | %d | %d | %d | %.2f ± %.2f | %.2f ± %.2f | %.2f |\n",
                model->info().size_label.c_str(), threads, r.n, prompt, gen, pp.mean, pp.stddev, tg.mean,
                tg.stddev, tg.mean / r.n);
  }
  for (const Row& r : rows)  // one line per N for scripts (tools/bench/compare-llamacpp-batched.sh)
    std::printf("parallel %d: pp %.2f t/s, tg %.2f t/s\n", r.n, spread(r.pp).mean, spread(r.tg).mean);
  return kExitOk;
}

struct Result_ {
  std::string test;
  int n = 0;
  int depth = 0;
  std::vector<double> tps;
};

}  // namespace

int cmd_bench(int argc, char** argv) {
  ModelFlags model_flags;
  model_flags.chunk = 512;  // llama-bench's default ubatch: pp512 is one step
  int n_prompt = 512, n_gen = 128, reps = 5;
  std::string output = "md", depth_list = "0";
  ArgParser p("bench", "-m MODEL [-p 512] [-n 128] [-d DEPTH] [-r 5] [-t N] [-o md|json]",
              "Prompt processing (ppN) and generation (tgN) speed, measured like llama-bench: random\n"
              "tokens, one warm-up run, then -r repetitions; tokens/s as mean +/- stddev. For tg also\n"
              "the weight bytes read per token and the bandwidth achieved, against a copy roofline\n"
              "measured in the same run on the same backend (a memcpy per thread, or a device copy).");
  model_flags.add_to(p);
  p.add_option("-p,--n-prompt", "N", &n_prompt, "prompt tokens of the pp test; 0 skips it (default: 512)");
  p.add_option("-n,--n-gen", "N", &n_gen, "generated tokens of the tg test; 0 skips it (default: 128)");
  p.add_option("-d,--depth", "N[,N...]", &depth_list,
               "tokens already in the context before each test; a list runs each depth (default: 0)");
  p.add_option("-r,--repetitions", "N", &reps, "timed repetitions of each test (default: 5)");
  p.add_choice("-o,--output", {"md", "json"}, &output, "report format (default: md)");
  std::string parallel_list;
  p.add_option("--parallel", "N[,N...]", &parallel_list,
               "many sequences at once instead (llama-batched-bench): N requests of -p tokens prefilled in "
               "one step, then -n decode steps; aggregate t/s per N (default -p 128 -n 128)");
  bool image = false;
  p.add_flag("-i,--image", &image,
             "also time encoding one image (random pixels): the vision tower + projector, -r times");
  if (Status s = p.parse(argc, argv, 2); !s.ok()) return fail("bench", kExitUsage, s.message());
  if (p.help_requested()) {
    std::fputs(p.help_text().c_str(), stdout);
    return kExitOk;
  }
  if (Status s = model_flags.check(); !s.ok()) return fail("bench", kExitUsage, s.message());
  std::vector<int> depths;
  for (size_t b = 0; b <= depth_list.size();) {
    const size_t e = std::min(depth_list.find(',', b), depth_list.size());
    const auto d = parse_int(std::string_view(depth_list).substr(b, e - b));
    if (!d || *d < 0 || *d > (1 << 30))
      return fail("bench", kExitUsage,
                  fmt::format("-d expects numbers >= 0 separated by commas, got '{}'", depth_list));
    depths.push_back(static_cast<int>(*d));
    b = e + 1;
  }
  if (n_prompt < 0 || n_gen < 0 || reps < 1)
    return fail("bench", kExitUsage, "-p and -n must be >= 0 and -r >= 1");
  std::vector<int> parallel;
  for (size_t b = 0; !parallel_list.empty() && b <= parallel_list.size();) {
    const size_t e = std::min(parallel_list.find(',', b), parallel_list.size());
    const auto n = parse_int(std::string_view(parallel_list).substr(b, e - b));
    if (!n || *n < 1 || *n > 4096)
      return fail("bench", kExitUsage,
                  fmt::format("--parallel expects numbers in [1, 4096] separated by commas, got '{}'",
                              parallel_list));
    parallel.push_back(static_cast<int>(*n));
    b = e + 1;
  }
  if (!parallel.empty()) {
    if (!p.given("--n-prompt")) n_prompt = 128;
    if (n_prompt < 1) return fail("bench", kExitUsage, "--parallel needs -p >= 1");
    if (depth_list != "0" || image)
      return fail("bench", kExitUsage, "--parallel takes neither -d nor --image");
    if (model_flags.context == 0) model_flags.context = n_prompt + n_gen + 1;
    auto loaded = load_model(model_flags);
    if (!loaded.ok()) return fail("bench", loaded.status());
    const int threads = model_flags.threads > 0
                            ? model_flags.threads
                            : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    return bench_parallel(loaded->model, parallel, n_prompt, n_gen, reps, threads, output, model_flags.model);
  }
  const int max_depth = *std::max_element(depths.begin(), depths.end());
  if (model_flags.context == 0) model_flags.context = max_depth + std::max(n_prompt, n_gen) + 1;
  if (image && !p.given("--ctx")) model_flags.context = std::max(model_flags.context, 1024);  // N + 6 ids

  auto loaded = load_model(model_flags);
  if (!loaded.ok()) return fail("bench", loaded.status());
  std::shared_ptr<Model> model = loaded->model;
  const ModelInfo& config = model->info();
  const std::string& size_label = config.size_label;
  uint64_t weight_bytes = 0;  // every text tensor, as stored
  for (const TensorInfo& t : config.tensors) weight_bytes += t.bytes;
  auto session_or = model->new_session();
  if (!session_or.ok()) return fail("bench", session_or.status());
  Session& s = **session_or;

  const int threads = model_flags.threads > 0
                          ? model_flags.threads
                          : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::mt19937 rng(1234);
  std::uniform_int_distribution<int32_t> tok(0, model->vocab_size() - 1);
  auto random_tokens = [&](int n) {
    std::vector<int32_t> v(n);
    for (int32_t& x : v) x = tok(rng);
    return v;
  };
  // Context with `depth` tokens (untimed): prefilled once per depth, then restored from a
  // saved state.
  int depth = 0, state_depth = -1;
  const std::string state_file = fmt::format("/tmp/gemma3-bench-{}.state", ::getpid());
  auto reset = [&]() -> Status {
    s.clear();
    if (depth == 0) return ok_status();
    if (state_depth == depth) return s.load_state(state_file);
    GEMMA3_TRY(s.feed_tokens(random_tokens(depth)));
    GEMMA3_TRY(s.save_state(state_file));
    state_depth = depth;
    return ok_status();
  };

  std::vector<Result_> results;
  for (const int d : depths) {
    depth = d;
    if (n_prompt > 0) {
      Result_ r{fmt::format("pp{}", n_prompt), n_prompt, depth, {}};
      for (int rep = -1; rep < reps; ++rep) {  // rep -1: warm-up
        if (Status st = reset(); !st.ok()) return fail("bench", st);
        const auto ids = random_tokens(n_prompt);
        const double t0 = now_seconds();
        if (Status st = s.feed_tokens(ids); !st.ok()) return fail("bench", st);
        const double dt = now_seconds() - t0;
        if (rep >= 0) r.tps.push_back(n_prompt / dt);
      }
      results.push_back(std::move(r));
    }
    if (n_gen > 0) {
      Result_ r{fmt::format("tg{}", n_gen), n_gen, depth, {}};
      for (int rep = -1; rep < reps; ++rep) {
        if (Status st = reset(); !st.ok()) return fail("bench", st);
        const auto ids = random_tokens(n_gen);
        const double t0 = now_seconds();
        for (int i = 0; i < n_gen; ++i)
          if (Status st = s.feed_tokens({ids[i]}); !st.ok()) return fail("bench", st);
        const double dt = now_seconds() - t0;
        if (rep >= 0) r.tps.push_back(n_gen / dt);
      }
      results.push_back(std::move(r));
    }
  }
  if (state_depth >= 0) std::remove(state_file.c_str());

  // Image encoding: fresh random pixels each time (so the session's image cache never hits);
  // the seconds are the session's image_encode_seconds (tower + projector, no prefill).
  std::vector<double> encode_s;
  if (image) {
    const int S = model->image_size();
    if (S == 0) return fail("bench", kExitUsage, "--image needs a multimodal model or --mmproj");
    std::uniform_real_distribution<float> px(-1.0f, 1.0f);
    for (int rep = -1; rep < reps; ++rep) {
      s.clear();
      std::vector<float> pixels(static_cast<size_t>(3) * S * S);
      for (float& x : pixels) x = px(rng);
      const double before = s.stats().image_encode_seconds;
      if (Status st = s.feed_image_pixels(pixels); !st.ok()) return fail("bench", st);
      if (rep >= 0) encode_s.push_back(s.stats().image_encode_seconds - before);
    }
  }

  // "..., backend cpu avx2 (2 threads), context 513" -> "cpu avx2 (2 threads)"
  std::string backend = model->description();
  if (const size_t b = backend.find("backend "); b != std::string::npos) {
    backend = backend.substr(b + 8);
    if (const size_t e = backend.find(", context"); e != std::string::npos) backend.resize(e);
  }
  const bool cpu = backend.find("cuda") == std::string::npos && backend.find("CUDA") == std::string::npos;
  const double roofline = model->copy_bandwidth();
  // The compute roofline: one prefill chunk's gate|up GEMM in bf16 on the backend's library.
  const int gemm_m = std::min(n_prompt, model_flags.chunk);
  const double gemm =
      n_prompt > 0 ? model->gemm_rate(gemm_m, 2 * int64_t{config.intermediate}, config.hidden) : 0;
  auto pp_flops_per_s = [&](const Result_& r, double tps) {
    return prefill_flops(config, r.n, r.depth) * tps / r.n;
  };

  if (output == "json") {
    nlohmann::json out = nlohmann::json::array();
    for (const Result_& r : results) {
      const Spread sp = spread(r.tps);
      nlohmann::json j = {
          {"model", model_flags.model}, {"size_label", size_label}, {"weight_bytes", weight_bytes},
          {"backend", backend},         {"threads", threads},       {"test", r.test},
          {"n_depth", r.depth},         {"samples_ts", r.tps},      {"avg_ts", sp.mean},
          {"stddev_ts", sp.stddev}};
      if (r.test.rfind("tg", 0) == 0) {
        j["bytes_per_token"] = weight_bytes;
        j["gb_per_s"] = sp.mean * static_cast<double>(weight_bytes) / 1e9;
        if (roofline > 0) j["pct_of_copy"] = 100.0 * sp.mean * static_cast<double>(weight_bytes) / roofline;
      }
      if (r.test.rfind("pp", 0) == 0) {
        const double f = pp_flops_per_s(r, sp.mean);
        j["tflop_per_s"] = f / 1e12;
        if (gemm > 0) j["pct_of_gemm"] = 100.0 * f / gemm;
      }
      if (roofline > 0) j["copy_gb_per_s"] = roofline / 1e9;
      if (gemm > 0) j["gemm_tflop_per_s"] = gemm / 1e12;
      out.push_back(std::move(j));
    }
    if (!encode_s.empty()) {
      const Spread sp = spread(encode_s);
      out.push_back({{"model", model_flags.model},
                     {"backend", backend},
                     {"threads", threads},
                     {"test", "image"},
                     {"image_size", model->image_size()},
                     {"samples_s", encode_s},
                     {"avg_s", sp.mean},
                     {"stddev_s", sp.stddev}});
    }
    std::printf("%s\n", out.dump(2).c_str());
    return kExitOk;
  }

  std::printf(
      "| model | size | backend | threads | test | t/s | bytes/token | GB/s | %% of copy | TFLOP/s | %% of "
      "GEMM |\n");
  std::printf(
      "| ----- | ---: | ------- | ------: | ---- | --: | ----------: | ---: | --------: | ------: | "
      "--------: |\n");
  for (const Result_& r : results) {
    const Spread sp = spread(r.tps);
    const bool tg = r.test.rfind("tg", 0) == 0;
    const std::string test = r.depth > 0 ? fmt::format("{} @ d{}", r.test, r.depth) : r.test;
    const double bw = sp.mean * static_cast<double>(weight_bytes);
    const double flops = tg ? 0 : pp_flops_per_s(r, sp.mean);
    std::printf("| gemma3 %s | %s | %s | %d | %s | %.2f ± %.2f | %s | %s | %s | %s | %s |\n",
                size_label.c_str(), human_bytes(weight_bytes).c_str(), backend.c_str(), threads, test.c_str(),
                sp.mean, sp.stddev, tg ? human_bytes(weight_bytes).c_str() : "",
                tg ? fmt::format("{:.1f}", bw / 1e9).c_str() : "",
                tg && roofline > 0 ? fmt::format("{:.1f}", 100.0 * bw / roofline).c_str() : "",
                tg ? "" : fmt::format("{:.3g}", flops / 1e12).c_str(),
                !tg && gemm > 0 ? fmt::format("{:.1f}", 100.0 * flops / gemm).c_str() : "");
  }
  if (!encode_s.empty()) {
    const Spread sp = spread(encode_s);
    std::printf("\nimage encode (%dx%d px, vision tower + projector): %.3f ± %.3f s\n", model->image_size(),
                model->image_size(), sp.mean, sp.stddev);
  }
  if (gemm > 0)
    std::printf("\ncompute roofline (cuBLAS bf16 GEMM %d x %lld x %d, same run): %.1f TFLOP/s\n", gemm_m,
                2 * static_cast<long long>(config.intermediate), config.hidden, gemm / 1e12);
  if (roofline > 0)
    std::printf("\nmemory roofline (%s, same run): %.1f GB/s read+write -> tg bound ~%.1f t/s\n",
                cpu ? fmt::format("memcpy, {} threads", threads).c_str() : "device-to-device copy",
                roofline / 1e9, roofline / static_cast<double>(weight_bytes));
  return kExitOk;
}

}  // namespace gemma3::cli
