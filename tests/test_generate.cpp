// Session::generate's finish reasons (issue #16): each reason, the count, what is streamed, and
// what the context holds afterwards (gemma3.h documents it), on the tiny model (512 ids).
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "gemma3/gemma3.h"
#include "test_util.h"

namespace gemma3 {
namespace {

const std::string kTiny = std::string(GEMMA3_SOURCE_DIR) + "/tests/data/tiny";

std::shared_ptr<Model> load(int context) {
  LoadOptions o;
  o.backend = BackendKind::kCpu;
  o.threads = 1;
  o.context = context;
  auto m = Model::load(kTiny, o);
  EXPECT_TRUE(m.ok()) << m.status().to_string();
  return m.ok() ? *m : nullptr;
}

struct Outcome {
  Result<GenerateResult> result = Status(ErrorCode::kInternal, "not run");
  std::string text;
  int events = 0;
  int position = 0;
};

Outcome generate(Session& s, const GenerateOptions& g, std::function<bool(int)> keep = nullptr) {
  Outcome r;
  r.result = s.generate(g, [&](const TokenEvent& e) {
    r.text += e.text;
    ++r.events;
    return keep ? keep(r.events) : true;
  });
  r.position = s.position();
  return r;
}

std::unique_ptr<Session> prompted(Model& m, int* prompt_tokens) {
  auto s = m.new_session().value();
  EXPECT_TRUE(s->feed_text("Once upon a time").ok());
  *prompt_tokens = s->position();
  return s;
}

TEST(Generate, MaxTokensFeedsEveryToken) {
  auto m = load(256);
  ASSERT_TRUE(m);
  int p = 0;
  auto s = prompted(*m, &p);
  GenerateOptions g;
  g.max_tokens = 5;
  g.sampling.temperature = 0;
  const Outcome r = generate(*s, g);
  ASSERT_TRUE(r.result.ok()) << r.result.status().to_string();
  EXPECT_EQ(r.result->finish, FinishReason::kMaxTokens);
  EXPECT_EQ(r.result->tokens, 5);
  EXPECT_EQ(r.position, p + 5);
  EXPECT_EQ(std::string(finish_reason_name(r.result->finish)), "max_tokens");
}

TEST(Generate, CallbackStopLeavesTheLastTokenOut) {
  auto m = load(256);
  ASSERT_TRUE(m);
  int p = 0;
  auto s = prompted(*m, &p);
  GenerateOptions g;
  g.max_tokens = 20;
  g.sampling.temperature = 0;
  const Outcome r = generate(*s, g, [](int events) { return events < 3; });
  ASSERT_TRUE(r.result.ok());
  EXPECT_EQ(r.result->finish, FinishReason::kCallback);
  EXPECT_EQ(r.result->tokens, 3);
  EXPECT_EQ(r.events, 3);
  EXPECT_EQ(r.position, p + 2);  // the third token was streamed, not fed
}

TEST(Generate, CancelFlagStopsBeforeTheNextToken) {
  auto m = load(256);
  ASSERT_TRUE(m);
  int p = 0;
  auto s = prompted(*m, &p);
  std::atomic<bool> cancel{false};
  GenerateOptions g;
  g.max_tokens = 20;
  g.cancel = &cancel;
  const Outcome r = generate(*s, g, [&](int events) {
    if (events == 4) cancel = true;
    return true;
  });
  ASSERT_TRUE(r.result.ok()) << "cancelling is a finish reason, not an error";
  EXPECT_EQ(r.result->finish, FinishReason::kCancelled);
  EXPECT_EQ(r.result->tokens, 4);
  EXPECT_EQ(r.position, p + 4);
}

TEST(Generate, ContextFullIsAFinishReason) {
  auto m = load(24);
  ASSERT_TRUE(m);
  int p = 0;
  auto s = prompted(*m, &p);
  GenerateOptions g;
  g.max_tokens = -1;
  const Outcome r = generate(*s, g);
  ASSERT_TRUE(r.result.ok()) << r.result.status().to_string();
  EXPECT_EQ(r.result->finish, FinishReason::kContextFull);
  EXPECT_EQ(r.position, 24);
  EXPECT_EQ(r.result->tokens, 24 - p + 1);  // the last sampled token found no room
}

// Near-uniform sampling over 512 ids reaches <eos> (id 1) within the context for this seed.
TEST(Generate, StopTokenIsNotInTheContext) {
  auto m = load(4096);
  ASSERT_TRUE(m);
  int p = 0;
  auto s = prompted(*m, &p);
  GenerateOptions g;
  g.max_tokens = -1;
  g.sampling.temperature = 1000;
  g.sampling.seed = 7;
  const Outcome r = generate(*s, g);
  ASSERT_TRUE(r.result.ok()) << r.result.status().to_string();
  EXPECT_EQ(r.result->finish, FinishReason::kStopToken);
  EXPECT_EQ(r.position, p + r.result->tokens);
  EXPECT_NE(s->tokens().back(), 1);
}

// ignore_eos: the same seeded run goes on past the <eos> it stopped at above, which is then
// streamed and in the context like any token.
TEST(Generate, IgnoreEosGoesPastTheStopToken) {
  auto m = load(4096);
  ASSERT_TRUE(m);
  int p = 0;
  auto s = prompted(*m, &p);
  GenerateOptions g;
  g.max_tokens = -1;
  g.sampling.temperature = 1000;
  g.sampling.seed = 7;
  const Outcome stopped = generate(*s, g);
  ASSERT_TRUE(stopped.result.ok());
  ASSERT_EQ(stopped.result->finish, FinishReason::kStopToken);
  const int until_eos = stopped.result->tokens;
  s = prompted(*m, &p);
  g.ignore_eos = true;
  g.max_tokens = until_eos + 5;
  const Outcome r = generate(*s, g);
  ASSERT_TRUE(r.result.ok()) << r.result.status().to_string();
  EXPECT_EQ(r.result->finish, FinishReason::kMaxTokens);
  EXPECT_EQ(r.result->tokens, until_eos + 5);
  EXPECT_EQ(s->tokens()[p + until_eos], 1) << "the <eos> sampled where the first run stopped";
}

// A stop string ends generation where it begins: the text before it is streamed, the string and
// anything after it are not, and the token that completed it is not in the context.
TEST(Generate, StopStringsAreNotStreamed) {
  auto m = load(256);
  ASSERT_TRUE(m);
  int p = 0;
  auto s = prompted(*m, &p);
  GenerateOptions g;
  g.max_tokens = 30;
  g.sampling.temperature = 0;
  const Outcome full = generate(*s, g);
  ASSERT_TRUE(full.result.ok());
  ASSERT_GE(full.text.size(), 12u) << full.text;
  const std::string stop = full.text.substr(full.text.size() / 2, 3);
  const size_t at = full.text.find(stop);

  auto t = prompted(*m, &p);
  g.stop_strings = {stop};
  const Outcome r = generate(*t, g);
  ASSERT_TRUE(r.result.ok());
  EXPECT_EQ(r.result->finish, FinishReason::kStopString);
  EXPECT_EQ(r.text, full.text.substr(0, at));
  EXPECT_EQ(r.text.find(stop), std::string::npos);
  EXPECT_EQ(r.position, p + r.result->tokens - 1);
}

// ---- log-probabilities (GenerateOptions::logprobs, Session::score) ---------------------------

// log-softmax of a logits row over its first n ids, in double, written here independently of
// the library: the reference the entries are held to.
std::vector<double> log_softmax(const std::vector<float>& logits, int n) {
  double mx = -INFINITY, sum = 0;
  for (int i = 0; i < n; ++i) mx = std::max(mx, double(logits[i]));
  for (int i = 0; i < n; ++i) sum += std::exp(double(logits[i]) - mx);
  std::vector<double> out(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) out[i] = double(logits[i]) - mx - std::log(sum);
  return out;
}

// Every generated token's entry (in the events, in order) holds its log-probability under the
// logits that predicted it, and the top ids are the most likely ones, most likely first: checked
// against a second session fed the same tokens one at a time.
TEST(Generate, LogprobsAreTheModelsDistribution) {
  auto m = load(256);
  ASSERT_TRUE(m);
  int p = 0;
  auto s = prompted(*m, &p);
  GenerateOptions g;
  g.max_tokens = 6;
  g.sampling.temperature = 0.8f;
  g.sampling.seed = 7;
  g.top_logprobs = 5;  // implies logprobs
  std::vector<TokenLogprobs> entries;
  const Result<GenerateResult> r = s->generate(g, [&](const TokenEvent& e) {
    EXPECT_FALSE(e.logprobs.empty());
    if (!e.logprobs.empty()) EXPECT_EQ(e.logprobs.back().id, e.id);
    entries.insert(entries.end(), e.logprobs.begin(), e.logprobs.end());
    return true;
  });
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  const std::vector<int32_t> generated(s->tokens().begin() + p, s->tokens().end());
  ASSERT_EQ(entries.size(), generated.size());

  const int n = std::min(m->vocab_size(), m->tokenizer().n_vocab());
  auto ref = prompted(*m, &p);
  for (size_t i = 0; i < entries.size(); ++i) {
    const std::vector<double> lp = log_softmax(testutil::to_vector(ref->last_logits()), n);
    EXPECT_EQ(entries[i].id, generated[i]);
    EXPECT_NEAR(entries[i].logprob, lp[generated[i]], 1e-5) << "token " << i;
    ASSERT_EQ(entries[i].top.size(), 5u);
    const double best = *std::max_element(lp.begin(), lp.end());
    EXPECT_NEAR(entries[i].top[0].logprob, best, 1e-5);
    for (size_t k = 0; k < 5; ++k) {
      EXPECT_NEAR(entries[i].top[k].logprob, lp[entries[i].top[k].id], 1e-5);
      if (k > 0) EXPECT_LE(entries[i].top[k].logprob, entries[i].top[k - 1].logprob);
    }
    // No id outside the top ranks above its last.
    int above = 0;
    for (double v : lp) above += v > entries[i].top[4].logprob + 1e-6;
    EXPECT_LE(above, 4) << "token " << i;
    ASSERT_TRUE(ref->feed_tokens({generated[i]}).ok());
  }
}

// Text held back while it could begin a stop string is sent later, with its tokens' entries:
// over all events, one entry per generated token, in order, the last event (id -1) included;
// and after every event the entries so far are exactly the tokens whose text has been sent
// (the text sent is their text plus at most a part of the next token's).
TEST(Generate, LogprobsTravelWithHeldBackText) {
  auto m = load(256);
  ASSERT_TRUE(m);
  int p = 0;
  auto s = prompted(*m, &p);
  GenerateOptions g;
  g.max_tokens = 12;
  g.sampling.temperature = 0;
  g.logprobs = true;
  g.stop_strings = {"\x01 never appears"};  // holds back up to 16 bytes
  struct Sent {
    std::string text;  // every event's text so far
    size_t entries;    // entries so far
  };
  std::vector<Sent> sent;
  std::vector<int32_t> ids;
  std::string text;
  int last_id = 0;
  const Result<GenerateResult> r = s->generate(g, [&](const TokenEvent& e) {
    for (const TokenLogprobs& t : e.logprobs) {
      ids.push_back(t.id);
      EXPECT_LE(t.logprob, 0.0f);
      EXPECT_TRUE(t.top.empty());
    }
    text += e.text;
    sent.push_back({text, ids.size()});
    last_id = e.id;
    return true;
  });
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_EQ(last_id, -1);  // the held-back tail came last
  const std::vector<int32_t> generated(s->tokens().begin() + p, s->tokens().end());
  EXPECT_EQ(ids, generated);
  ASSERT_GT(sent.size(), 1u);
  const Tokenizer& tok = m->tokenizer();
  for (const Sent& e : sent) {
    std::string done;
    for (size_t i = 0; i < e.entries; ++i) done += tok.decode(generated[i]);
    const std::string next = e.entries < generated.size() ? tok.decode(generated[e.entries]) : "";
    EXPECT_EQ(e.text.compare(0, done.size(), done), 0) << "entries for text not sent yet";
    EXPECT_LT(e.text.size(), done.size() + std::max<size_t>(next.size(), 1))
        << "text sent without its entries";
  }
}

TEST(Generate, TopLogprobsOutOfRangeNamesTheField) {
  auto m = load(64);
  ASSERT_TRUE(m);
  int p = 0;
  auto s = prompted(*m, &p);
  for (int top : {-1, kMaxTopLogprobs + 1}) {
    GenerateOptions g;
    g.top_logprobs = top;
    const auto r = s->generate(g, [](const TokenEvent&) { return true; });
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find("GenerateOptions::top_logprobs"), std::string::npos)
        << r.status().to_string();
  }
}

// score: each token's log-probability given what precedes it, as the logits of one feed of the
// whole text give it (70 tokens: more than one of score's 64-token pieces); the context then
// ends with the continuation. An empty context and a non-text id are errors.
TEST(Score, EqualsTheLogitsOfFeedingTheText) {
  auto m = load(256);
  ASSERT_TRUE(m);
  int p = 0;
  auto s = prompted(*m, &p);
  std::vector<int32_t> cont;
  for (int i = 0; i < 70; ++i) cont.push_back(10 + (i * 37) % 400);
  const auto scored = s->score(cont);
  ASSERT_TRUE(scored.ok()) << scored.status().to_string();
  ASSERT_EQ(scored->size(), cont.size());
  EXPECT_EQ(s->position(), p + 70);

  auto ref = m->new_session().value();
  ASSERT_TRUE(ref->feed_text("Once upon a time").ok());
  const std::vector<float> first = testutil::to_vector(ref->last_logits());
  ref->keep_all_logits(true);
  ASSERT_TRUE(ref->feed_tokens(cont).ok());
  const int n = std::min(m->vocab_size(), m->tokenizer().n_vocab());
  const size_t V = static_cast<size_t>(m->vocab_size());
  for (size_t t = 0; t < cont.size(); ++t) {
    const std::vector<float> row = t == 0 ? first
                                          : std::vector<float>(ref->all_logits().begin() + (t - 1) * V,
                                                               ref->all_logits().begin() + t * V);
    EXPECT_NEAR((*scored)[t], log_softmax(row, n)[cont[t]], 1e-3) << "token " << t;
  }

  auto empty = m->new_session().value();
  EXPECT_EQ(empty->score({5}).status().code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(s->score({-3}).status().code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(s->position(), p + 70);  // nothing fed by a refused call
}

// ---- SessionOptions::context ---------------------------------------------------------------

// Sessions of one model with their own context: a longer one holds what the model's default
// cannot, a shorter one refuses past its own (naming it), fork keeps the source's, and bad
// values name the field.
TEST(SessionContext, EachSessionHasItsOwn) {
  auto m = load(64);
  ASSERT_TRUE(m);
  std::vector<int32_t> ids(100, 300);
  ids[0] = 2;
  auto def = m->new_session().value();
  EXPECT_EQ(def->context_length(), 64);
  EXPECT_EQ(def->feed_tokens(ids).code(), ErrorCode::kOutOfRange);

  SessionOptions so;
  so.context = 200;
  auto big = m->new_session(so).value();
  EXPECT_EQ(big->context_length(), 200);
  ASSERT_TRUE(big->feed_tokens(ids).ok());
  GenerateOptions g;
  g.max_tokens = 4;
  ASSERT_TRUE(big->generate(g, [](const TokenEvent&) { return true; }).ok());
  auto copy = big->fork().value();
  EXPECT_EQ(copy->context_length(), 200);
  EXPECT_EQ(copy->position(), big->position());

  so.context = 16;
  auto small = m->new_session(so).value();
  EXPECT_EQ(small->context_length(), 16);
  const Status st = small->feed_tokens(std::vector<int32_t>(ids.begin(), ids.begin() + 20));
  EXPECT_EQ(st.code(), ErrorCode::kOutOfRange);
  EXPECT_NE(st.message().find("16"), std::string::npos) << st.to_string();

  for (int bad : {-1, 1 << 30}) {
    so.context = bad;
    const auto r = m->new_session(so);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find("SessionOptions::context"), std::string::npos)
        << r.status().to_string();
  }
}

// ---- LoadOptions::batch_invariant ------------------------------------------------------------

// The logits of every position of `ids` fed in pieces of `piece` tokens (0: one feed call),
// [ids.size() * vocab].
std::vector<float> logits_fed_in_pieces(Model& m, const std::vector<int32_t>& ids, size_t piece) {
  auto s = m.new_session().value();
  std::vector<float> all;
  if (piece == 0) piece = ids.size();
  for (size_t off = 0; off < ids.size(); off += piece) {
    s->keep_all_logits(true);
    const std::vector<int32_t> part(ids.begin() + off, ids.begin() + std::min(ids.size(), off + piece));
    EXPECT_TRUE(s->feed_tokens(part).ok());
    all.insert(all.end(), s->all_logits().begin(), s->all_logits().end());
  }
  return all;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double d = a.size() == b.size() ? 0 : INFINITY;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) d = std::max(d, std::fabs(double(a[i]) - b[i]));
  return d;
}

// With batch_invariant, a position's logits are the same bits whether the text is fed in one
// call (prefill chunks of 16 here, the last one shorter), token by token (decode), or in pieces
// of 5: on the f32 and Q8_0 tiny models (int8 activations by default), and on the real 270M
// Q4_K_M when present. The default's difference is printed (docs/perf.md records it).
TEST(BatchInvariance, LogitsDoNotDependOnHowTheTextWasSplit) {
  std::vector<std::string> paths = {kTiny, std::string(GEMMA3_SOURCE_DIR) + "/tests/data/tiny-q8_0.gguf"};
  const char* m270 = std::getenv("GEMMA3_MODEL_270M");
  if (m270 && *m270)
    paths.push_back(m270);
  else
    std::printf("BatchInvariance: the 270M is not checked (set GEMMA3_MODEL_270M)\n");
  for (const std::string& path : paths) {
    for (bool invariant : {false, true}) {
      LoadOptions o;
      o.backend = BackendKind::kCpu;
      o.threads = 2;
      o.context = 128;
      o.prefill_chunk = 16;
      o.batch_invariant = invariant;
      auto m = Model::load(path, o);
      ASSERT_TRUE(m.ok()) << m.status().to_string();
      std::vector<int32_t> ids = {2};
      const int vocab = std::min((*m)->vocab_size(), (*m)->tokenizer().n_vocab());
      for (int i = 0; ids.size() < 40; ++i) ids.push_back(10 + (i * 7919) % (std::min(vocab, 4000) - 10));
      const std::vector<float> whole = logits_fed_in_pieces(**m, ids, 0);
      const std::vector<float> single = logits_fed_in_pieces(**m, ids, 1);
      const std::vector<float> fives = logits_fed_in_pieces(**m, ids, 5);
      ASSERT_EQ(whole.size(), ids.size() * static_cast<size_t>((*m)->vocab_size()));
      std::printf(
          "BatchInvariance: %s, batch_invariant=%d: max |logit difference| one feed vs token by token %.3g, "
          "vs pieces of 5 %.3g\n",
          path.c_str(), invariant, max_abs_diff(whole, single), max_abs_diff(whole, fives));
      if (!invariant) continue;
      EXPECT_TRUE(whole == single) << path << ": token by token differs by " << max_abs_diff(whole, single);
      EXPECT_TRUE(whole == fives) << path << ": pieces of 5 differ by " << max_abs_diff(whole, fives);
    }
  }
}

TEST(BatchInvariance, IsACpuOption) {
  LoadOptions o;
  o.backend = BackendKind::kCuda;
  o.batch_invariant = true;
  const auto m = Model::load(kTiny, o);
  ASSERT_FALSE(m.ok());
  // Without a CUDA device the backend's own error may come first; with one, ours names the option.
  if (m.status().message().find("batch_invariant") == std::string::npos)
    std::printf("BatchInvariance.IsACpuOption: CUDA refused first: %s\n", m.status().to_string().c_str());
}

// Model::is_base_model: a Hugging Face folder does not say (false). The 270M GGUF, which says
// it is a base model: CliModel.RunCompletesABaseModelAsRawText.
TEST(Generate, HfFoldersAreNotBaseModels) {
  auto tiny = load(64);
  ASSERT_TRUE(tiny);
  EXPECT_FALSE(tiny->is_base_model());
}

}  // namespace
}  // namespace gemma3
