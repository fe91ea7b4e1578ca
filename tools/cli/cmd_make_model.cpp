// gemma3 make-model: writes a random-weight Gemma 3 checkpoint with the real shapes and
// metadata (src/dev/make_model.h), for tests and benchmarks without downloading weights.
//
//   gemma3 make-model --size 4b --type q4_k -o /tmp/g4b.gguf --vision   (+ /tmp/g4b.mmproj.gguf)
//   gemma3 make-model --size tiny --type fp8 -o /tmp/tiny-fp8            (HF folder)
#include <fmt/format.h>

#include <chrono>
#include <cstdio>

#include "cli_common.h"
#include "commands.h"
#include "dev/make_model.h"

namespace gemma3::cli {
namespace {

DType type_from_flag(const std::string& t) {
  if (t == "f32") return DType::kF32;
  if (t == "f16") return DType::kF16;
  if (t == "q8_0") return DType::kQ8_0;
  if (t == "q4_0") return DType::kQ4_0;
  if (t == "q4_k") return DType::kQ4_K;
  if (t == "fp8") return DType::kF8E4M3;
  return DType::kBF16;
}

}  // namespace

int cmd_make_model(int argc, char** argv) {
  MakeModelOptions o;
  std::string size = "tiny", type = "bf16", out;
  bool quiet = false;
  ArgParser p(
      "make-model",
      "--size 270m|1b|4b|12b|27b|tiny --type f32|bf16|f16|q8_0|q4_0|q4_k|fp8 [--vision] -o OUT [--seed N]\n"
      "       [--layers N --hidden N --intermediate N --heads N --kv-heads N --head-dim N --vocab N --window "
      "N]",
      "Writes a Gemma 3 checkpoint with random weights, the real shapes and metadata and a synthesized\n"
      "262144-piece vocabulary: a GGUF as llama.cpp writes it (q4_0: F16 embedding like Google's QAT\n"
      "files; q4_k: Q4_K_M-style mix with Q8_0 where rows are not 256-divisible), or for fp8 a Hugging\n"
      "Face folder in the compressed-tensors layout. --vision adds the SigLIP tower: OUT.mmproj.gguf\n"
      "beside a GGUF, or the vision tensors inside the fp8 folder. The same --seed gives the same\n"
      "weights in every type.");
  p.add_choice("--size", {"270m", "1b", "4b", "12b", "27b", "tiny"}, &size, "model size (default tiny)");
  p.add_choice("--type", {"f32", "bf16", "f16", "q8_0", "q4_0", "q4_k", "fp8"}, &type,
               "weight type (default bf16)");
  p.add_flag("--vision", &o.vision, "add the vision tower and projector (4b, 12b, 27b, tiny)");
  p.add_option("-o,--output", "OUT", &out, "output .gguf file, or folder for fp8 (required)");
  p.add_option("--seed", "N", &o.seed, "random seed (default 0)");
  p.add_option("--layers", "N", &o.layers, "override the layer count");
  p.add_option("--hidden", "N", &o.hidden, "override the hidden size");
  p.add_option("--intermediate", "N", &o.intermediate, "override the MLP width");
  p.add_option("--heads", "N", &o.heads, "override the attention head count");
  p.add_option("--kv-heads", "N", &o.kv_heads, "override the key/value head count");
  p.add_option("--head-dim", "N", &o.head_dim, "override the head dimension");
  p.add_option("--vocab", "N", &o.vocab, "override the vocabulary size (>= 400)");
  p.add_option("--window", "N", &o.window, "override the sliding window");
  p.add_flag("-q,--quiet", &quiet, "no progress line");
  if (Status s = p.parse(argc, argv, 2); !s.ok()) return fail("make-model", kExitUsage, s.message());
  if (p.help_requested()) {
    std::fputs(p.help_text().c_str(), stdout);
    return kExitOk;
  }
  if (out.empty()) return fail("make-model", kExitUsage, "-o OUT is required");
  o.size = size;
  o.type = type_from_flag(type);
  auto config = make_model_config(o);
  if (!config.ok()) return fail("make-model", kExitUsage, config.status().message());

  using Clock = std::chrono::steady_clock;
  const auto t0 = Clock::now();
  auto last = t0;
  int last_pct = -1;
  auto progress = [&](const MakeModelProgress& pr) {
    if (quiet) return;
    const int pct = pr.bytes_total ? static_cast<int>(100 * pr.bytes_done / pr.bytes_total) : 100;
    const auto now = Clock::now();
    if (pct == last_pct && now - last < std::chrono::milliseconds(250)) return;
    last_pct = pct, last = now;
    std::fprintf(stderr, "\rmake-model: %3d%%  %s / %s  %-40.40s", pct, human_bytes(pr.bytes_done).c_str(),
                 human_bytes(pr.bytes_total).c_str(), pr.tensor.c_str());
    std::fflush(stderr);
  };
  Status s = make_model(o, out, progress);
  if (!quiet) std::fputs("\n", stderr);
  if (!s.ok()) return fail("make-model", s);
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  std::fprintf(stderr, "make-model: wrote %s%s (%s, %d layers, hidden %d, vocab %d) in %.1f s\n", out.c_str(),
               o.vision && o.type != DType::kF8E4M3 ? (" and " + make_model_mmproj_path(out)).c_str() : "",
               config->size_label.c_str(), config->n_layers, config->hidden, config->vocab_size, secs);
  return kExitOk;
}

}  // namespace gemma3::cli
