// What generation does with each sampled token, shared by Session::generate and the Engine:
// stop tokens, stop strings (held back while they could still be forming, never streamed),
// log-probabilities, the finish reason. The caller samples and runs the model; a TokenStream
// turns the ids into TokenEvents.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "gemma3/gemma3.h"

namespace gemma3 {

// Sampling options in range, named by their field (a NaN temperature would otherwise divide
// every logit into NaN), and top_logprobs in [0, kMaxTopLogprobs].
Status check_generate_options(const GenerateOptions& o);

// The log-softmax of a logits row of n ids: logprob(id) = l[id] - max - log(sum exp(l - max)),
// in double; NaN counts as -inf (as the sampler treats it), and a row without a finite logit
// gives -inf everywhere.
class LogSoftmax {
 public:
  LogSoftmax(const float* logits, int n);
  float operator()(int32_t id) const;
  // The k most likely ids, most likely first, ties by lower id (k <= n).
  std::vector<TokenLogprob> top(int k) const;

 private:
  const float* l_;
  int n_;
  double shift_;
};

class TokenStream {
 public:
  using OnToken = std::function<bool(const TokenEvent&)>;
  // eos_ids: the ids that end generation; n_allowed: the width of the rows given to accept.
  TokenStream(const GenerateOptions& options, const Tokenizer& tokenizer, std::vector<int32_t> eos_ids,
              int n_allowed);

  // Whether accept needs the step's logits row on the host.
  bool wants_logprobs() const { return want_logprobs_; }

  // The sampled id of one step (row: its logits [n_allowed] on the host when wants_logprobs()).
  // Calls on_token with the text that is now certain. Returns true while generation goes on;
  // false once it finished (a stop token, a stop string, on_token returned false), with
  // result() saying why.
  bool accept(int32_t id, const float* row, const OnToken& on_token);
  // Ends generation for another reason (max tokens, context full, cancelled).
  void finish(FinishReason reason) { result_.finish = reason; }
  // Streams the held-back text that did not become a stop string (not after kCallback). Call once
  // at the end, when no error occurred.
  void flush(const OnToken& on_token);
  const GenerateResult& result() const { return result_; }

 private:
  void take_logprobs(size_t bytes, TokenEvent& e);

  const GenerateOptions o_;
  const Tokenizer& tok_;
  std::vector<int32_t> eos_;
  int n_allowed_;
  bool want_logprobs_;
  size_t longest_stop_ = 0;
  // Text held back while it could still be the start of a stop string (and, with logprobs, the
  // entries of its tokens, each with the end of its text in pending_).
  std::string pending_;
  std::vector<std::pair<size_t, TokenLogprobs>> pending_logprobs_;
  GenerateResult result_;
};

}  // namespace gemma3
