// gemma3 perplexity: the perplexity of a text file, computed the way llama.cpp's
// llama-perplexity does (tools/perplexity/perplexity.cpp, `perplexity()`), so the numbers can
// be compared with it:
//
//  * tokens = [<bos>] + tokenize(whole file)   (common_tokenize(..., add_bos = true))
//  * n_chunks = tokens / ctx non-overlapping windows; at least 2 * ctx tokens are required
//  * window i = tokens[i*ctx, (i+1)*ctx) with its first token replaced by <bos>, run from an
//    empty context
//  * only the second half is scored: logits at window positions first = ctx/2 .. ctx-2
//    predict tokens first+1 .. ctx-1, i.e. ctx - first - 1 tokens per window
//  * nll = -log softmax(logits)[next token] over all vocab_size logits; ppl = exp(mean nll),
//    and the ± estimate is ppl * sqrt((mean(nll^2) - mean(nll)^2) / (count - 1)).
//
// The unscored first half is fed without keeping logits, the scored half in pieces of
// kScoreBatch tokens, so at most kScoreBatch x vocab floats are held (64 MiB at 262144).
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "cli_common.h"
#include "commands.h"

namespace gemma3::cli {

namespace {

constexpr int kScoreBatch = 64;

// -log softmax(logits)[target], in double.
double negative_log_prob(const float* logits, int n_vocab, int32_t target) {
  float max_logit = logits[0];
  for (int j = 1; j < n_vocab; ++j) max_logit = std::max(max_logit, logits[j]);
  double sum = 0;
  for (int j = 0; j < n_vocab; ++j) sum += std::exp(static_cast<double>(logits[j]) - max_logit);
  return -(static_cast<double>(logits[target]) - max_logit - std::log(sum));
}

struct Totals {
  double nll = 0;   // sum of -log p
  double nll2 = 0;  // sum of (-log p)^2
  int64_t count = 0;
  double ppl() const { return std::exp(nll / count); }
  // Standard error of the ppl estimate, as llama-perplexity prints it.
  double ppl_error() const {
    const double mean = nll / count;
    const double var = nll2 / count - mean * mean;
    return var > 0 && count > 1 ? std::sqrt(var / (count - 1)) * ppl() : 0.0;
  }
};

}  // namespace

int cmd_perplexity(int argc, char** argv) {
  ModelFlags model_flags;
  model_flags.context = 512;
  std::string file, output = "text";
  int chunks = -1;

  ArgParser p("perplexity", "-m MODEL -f FILE [options]",
              "Perplexity of a text file, computed like llama-perplexity: the text is split into\n"
              "windows of --ctx tokens, each run from an empty context with <bos> in place of its\n"
              "first token, and the second half of each window is scored. Running values go to\n"
              "stderr, the final `ppl = X +/- E` (or a JSON object with -o json) to stdout.");
  model_flags.add_to(p, /*with_context=*/false);
  p.add_option("--ctx", "N", &model_flags.context, "tokens per window (default: 512)");
  p.add_option("-f,--file", "FILE", &file, "text file to score (required)");
  p.add_option("--chunks", "N", &chunks, "score at most N windows; -1: all (default: -1)");
  p.add_choice("-o,--output", {"text", "json"}, &output, "result format on stdout (default: text)");
  if (Status s = p.parse(argc, argv, 2); !s.ok()) return fail("perplexity", kExitUsage, s.message());
  if (p.help_requested()) {
    std::fputs(p.help_text().c_str(), stdout);
    return kExitOk;
  }
  if (Status s = model_flags.check(); !s.ok()) return fail("perplexity", kExitUsage, s.message());
  if (file.empty()) return fail("perplexity", kExitUsage, "-f FILE is required");
  const int ctx = model_flags.context;
  if (ctx < 4) return fail("perplexity", kExitUsage, fmt::format("--ctx must be >= 4, got {}", ctx));
  if (chunks == 0 || chunks < -1)
    return fail("perplexity", kExitUsage, fmt::format("--chunks must be -1 or >= 1, got {}", chunks));
  auto text = read_prompt("", file, "text", kMaxTextFileBytes);
  if (!text.ok()) return fail("perplexity", text.status());

  install_interrupt_handler();
  auto loaded = load_model(model_flags);
  if (!loaded.ok()) return fail("perplexity", loaded.status());
  std::shared_ptr<Model> model = loaded->model;
  if (model->context_length() < ctx) {
    return fail("perplexity", kExitResource,
                fmt::format("the model loaded with a context of {} tokens, fewer than --ctx {}",
                            model->context_length(), ctx));
  }
  const Tokenizer& tok = model->tokenizer();
  const int n_vocab = model->vocab_size();

  // [n_tokens]: <bos> then the whole file.
  std::vector<int32_t> tokens = {tok.bos_id()};
  {
    auto ids = tok.encode(*text);
    if (!ids.ok()) return fail("perplexity", ids.status().with_context(file));
    tokens.insert(tokens.end(), ids->begin(), ids->end());
  }
  if (static_cast<int64_t>(tokens.size()) < 2 * static_cast<int64_t>(ctx)) {
    return fail(
        "perplexity", kExitBadInput,
        fmt::format("'{}' has {} tokens (with <bos>); at least 2 x --ctx = {} are needed: use a smaller "
                    "--ctx or a longer text",
                    file, tokens.size(), 2 * ctx));
  }
  const int n_chunk_max = static_cast<int>(tokens.size() / ctx);
  const int n_chunk = chunks < 0 ? n_chunk_max : std::min(chunks, n_chunk_max);
  const int first = ctx / 2;
  std::fprintf(stderr, "perplexity: %zu tokens, %d windows of %d tokens, scoring %d tokens each\n",
               tokens.size(), n_chunk, ctx, ctx - first - 1);

  auto session_or = model->new_session();
  if (!session_or.ok()) return fail("perplexity", session_or.status());
  std::unique_ptr<Session> session = std::move(session_or).value();

  Totals totals;
  const auto t_start = std::chrono::steady_clock::now();
  for (int i = 0; i < n_chunk; ++i) {
    const int64_t start = static_cast<int64_t>(i) * ctx;
    // window: [ctx] tokens, window[0] = <bos>
    std::vector<int32_t> window(tokens.begin() + start, tokens.begin() + start + ctx);
    window[0] = tok.bos_id();

    session->clear();
    session->keep_all_logits(false);
    if (Status s = session->feed_tokens({window.begin(), window.begin() + first}); !s.ok())
      return fail("perplexity", s.with_context(fmt::format("window {}", i + 1)));
    session->keep_all_logits(true);
    // Positions first .. ctx-2 are fed with logits kept; position ctx-1's logits predict past
    // the window and are not needed, so it is not fed at all.
    for (int b = first; b < ctx - 1; b += kScoreBatch) {
      const int e = std::min(b + kScoreBatch, ctx - 1);
      if (interrupt_flag().load()) {
        std::fprintf(stderr, "\ninterrupted after %d windows\n", i);
        if (totals.count > 0) std::fprintf(stderr, "partial ppl = %.4f\n", totals.ppl());
        return kExitInterrupted;
      }
      if (Status s = session->feed_tokens({window.begin() + b, window.begin() + e}); !s.ok())
        return fail("perplexity", s.with_context(fmt::format("window {}", i + 1)));
      const std::span<const float> logits = session->all_logits();  // [e - b, n_vocab]
      if (logits.size() != static_cast<size_t>(e - b) * n_vocab) {
        return fail("perplexity", internal_error(fmt::format("all_logits holds {} floats, expected {} x {}",
                                                             logits.size(), e - b, n_vocab)));
      }
      for (int j = b; j < e; ++j) {
        const double nll =
            negative_log_prob(logits.data() + static_cast<size_t>(j - b) * n_vocab, n_vocab, window[j + 1]);
        totals.nll += nll;
        totals.nll2 += nll * nll;
        ++totals.count;
      }
    }
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
    std::fprintf(stderr, "[%d/%d] ppl %.4f +/- %.4f  (%.1f s, ETA %.0f s)\n", i + 1, n_chunk, totals.ppl(),
                 totals.ppl_error(), elapsed, elapsed / (i + 1) * (n_chunk - i - 1));
  }
  session->keep_all_logits(false);

  if (output == "json") {
    nlohmann::json j = {{"ppl", totals.ppl()},
                        {"ppl_error", totals.ppl_error()},
                        {"nll", totals.nll / totals.count},
                        {"tokens_scored", totals.count},
                        {"tokens_total", tokens.size()},
                        {"chunks", n_chunk},
                        {"ctx", ctx},
                        {"file", file}};
    std::printf("%s\n", j.dump(2).c_str());
  } else {
    std::printf("ppl = %.4f +/- %.5f\n", totals.ppl(), totals.ppl_error());
  }
  return kExitOk;
}

}  // namespace gemma3::cli
