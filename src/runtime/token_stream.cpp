#include "runtime/token_stream.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

namespace gemma3 {

Status check_generate_options(const GenerateOptions& go) {
  const SamplingOptions& o = go.sampling;
  auto bad = [](const char* field, double v, const char* want) {
    return invalid_argument(fmt::format("SamplingOptions::{} is {}; it must be {}", field, v, want));
  };
  if (!(o.temperature >= 0.0f) || std::isinf(o.temperature))
    return bad("temperature", o.temperature, "a finite number >= 0 (0: greedy)");
  if (o.top_k < 0) return bad("top_k", o.top_k, ">= 0 (0: off)");
  if (!(o.top_p > 0.0f && o.top_p <= 1.0f)) return bad("top_p", o.top_p, "in (0, 1] (1: off)");
  if (!(o.min_p >= 0.0f && o.min_p <= 1.0f)) return bad("min_p", o.min_p, "in [0, 1] (0: off)");
  if (!(o.repeat_penalty > 0.0f) || std::isinf(o.repeat_penalty))
    return bad("repeat_penalty", o.repeat_penalty, "a finite number > 0 (1: off)");
  if (o.repeat_last_n < -1) return bad("repeat_last_n", o.repeat_last_n, ">= -1 (-1: the whole context)");
  if (go.top_logprobs < 0 || go.top_logprobs > kMaxTopLogprobs)
    return invalid_argument(fmt::format("GenerateOptions::top_logprobs is {}; it must be in [0, {}]",
                                        go.top_logprobs, kMaxTopLogprobs));
  return ok_status();
}

LogSoftmax::LogSoftmax(const float* logits, int n) : l_(logits), n_(n) {
  double mx = -INFINITY;
  for (int i = 0; i < n; ++i)
    if (!std::isnan(l_[i])) mx = std::max(mx, double(l_[i]));
  double sum = 0;
  if (std::isfinite(mx))
    for (int i = 0; i < n; ++i)
      if (!std::isnan(l_[i])) sum += std::exp(double(l_[i]) - mx);
  shift_ = std::isfinite(mx) ? mx + std::log(sum) : INFINITY;
}

float LogSoftmax::operator()(int32_t id) const {
  const float l = l_[id];
  return std::isnan(l) || !std::isfinite(shift_) ? -INFINITY : static_cast<float>(double(l) - shift_);
}

std::vector<TokenLogprob> LogSoftmax::top(int k) const {
  auto before = [&](int32_t a, int32_t b) {  // a ranks before b
    const float la = std::isnan(l_[a]) ? -INFINITY : l_[a], lb = std::isnan(l_[b]) ? -INFINITY : l_[b];
    return la > lb || (la == lb && a < b);
  };
  std::vector<int32_t> heap;  // the best k so far, the worst of them at the front
  for (int32_t i = 0; i < n_ && k > 0; ++i) {
    if (static_cast<int>(heap.size()) < k) {
      heap.push_back(i);
      std::push_heap(heap.begin(), heap.end(), before);
    } else if (before(i, heap.front())) {
      std::pop_heap(heap.begin(), heap.end(), before);
      heap.back() = i;
      std::push_heap(heap.begin(), heap.end(), before);
    }
  }
  std::sort(heap.begin(), heap.end(), before);
  std::vector<TokenLogprob> out;
  for (int32_t id : heap) out.push_back({id, (*this)(id)});
  return out;
}

TokenStream::TokenStream(const GenerateOptions& options, const Tokenizer& tokenizer,
                         std::vector<int32_t> eos_ids, int n_allowed)
    : o_(options),
      tok_(tokenizer),
      eos_(options.ignore_eos ? std::vector<int32_t>() : std::move(eos_ids)),
      n_allowed_(n_allowed),
      want_logprobs_(options.logprobs || options.top_logprobs > 0) {
  for (const auto& s : o_.stop_strings) longest_stop_ = std::max(longest_stop_, s.size());
  result_.finish = FinishReason::kMaxTokens;
}

// Moves the entries of the tokens whose text ends within the first `bytes` of pending into e.
void TokenStream::take_logprobs(size_t bytes, TokenEvent& e) {
  size_t k = 0;
  while (k < pending_logprobs_.size() && pending_logprobs_[k].first <= bytes)
    e.logprobs.push_back(std::move(pending_logprobs_[k++].second));
  pending_logprobs_.erase(pending_logprobs_.begin(),
                          pending_logprobs_.begin() + static_cast<std::ptrdiff_t>(k));
  for (auto& [end, entry] : pending_logprobs_) end -= bytes;
}

bool TokenStream::accept(int32_t id, const float* row, const OnToken& on_token) {
  if (std::find(eos_.begin(), eos_.end(), id) != eos_.end()) {
    result_.finish = FinishReason::kStopToken;
    return false;
  }
  pending_ += tok_.decode(id);
  if (want_logprobs_) {
    const LogSoftmax lp(row, n_allowed_);
    pending_logprobs_.push_back({pending_.size(), TokenLogprobs{id, lp(id), lp.top(o_.top_logprobs)}});
  }
  bool stop = false;
  size_t emit = pending_.size();
  for (const auto& s : o_.stop_strings) {
    if (s.empty()) continue;
    size_t at = pending_.find(s);
    if (at != std::string::npos) {
      stop = true;
      emit = std::min(emit, at);
    }
  }
  if (!stop && longest_stop_ > 0)
    emit = pending_.size() > longest_stop_ - 1 ? pending_.size() - (longest_stop_ - 1) : 0;
  bool keep_going = true;
  if (emit > 0) {
    TokenEvent e{id, pending_.substr(0, emit), {}};
    take_logprobs(emit, e);
    keep_going = on_token(e);
  }
  pending_.erase(0, stop ? pending_.size() : emit);  // the stop string and what follows it: dropped
  if (stop) pending_logprobs_.clear();
  ++result_.tokens;
  if (stop || !keep_going) {
    result_.finish = stop ? FinishReason::kStopString : FinishReason::kCallback;
    return false;
  }
  return true;
}

void TokenStream::flush(const OnToken& on_token) {
  if (pending_.empty() || result_.finish == FinishReason::kCallback) return;
  TokenEvent e{-1, pending_, {}};
  take_logprobs(pending_.size(), e);
  pending_.clear();
  on_token(e);
}

}  // namespace gemma3
