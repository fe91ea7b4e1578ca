// The Engine (include/gemma3/engine.h, issue #17): requests decoded together give what a lone
// Session gives for the same prompt and options (token for token, with batch_invariant, on the
// tiny model and on the real 270M), whatever else is in the batch; cancellation of one request;
// requests finishing while others run; many threads submitting at once (also under TSan);
// a full queue; bad requests; shutdown with work left; chat messages with images (files and
// bytes in memory) on the tiny vision model, alone and beside text requests, prefix reuse that
// tells images apart, and the image errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <fstream>
#include <future>
#include <iterator>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "gemma3/engine.h"
#include "gemma3/gemma3.h"
#include "test_util.h"

namespace gemma3 {
namespace {

std::shared_ptr<Model> load(const std::string& path, int context, bool invariant, int threads = 2) {
  LoadOptions o;
  o.backend = BackendKind::kCpu;
  o.threads = threads;
  o.context = context;
  o.batch_invariant = invariant;
  auto m = Model::load(path, o);
  EXPECT_TRUE(m.ok()) << m.status().to_string();
  return m.ok() ? *m : nullptr;
}

struct Output {
  Result<GenerateResult> result = Status(ErrorCode::kInternal, "not run");
  std::string text;
  std::vector<int32_t> ids;
  std::vector<TokenLogprobs> logprobs;
};

Output collect(const std::function<Result<GenerateResult>(const Engine::OnToken&)>& run) {
  Output out;
  out.result = run([&](const TokenEvent& e) {
    out.text += e.text;
    if (e.id >= 0) out.ids.push_back(e.id);
    out.logprobs.insert(out.logprobs.end(), e.logprobs.begin(), e.logprobs.end());
    return true;
  });
  return out;
}

// What a lone session gives for the request.
Output reference(Model& m, const EngineRequest& r) {
  auto s = m.new_session().value();
  Status st = !r.tokens.empty() ? s->feed_tokens(r.tokens)
              : !r.text.empty() ? s->feed_text(r.text)
                                : s->feed_chat(r.messages);
  EXPECT_TRUE(st.ok()) << st.to_string();
  return collect([&](const Engine::OnToken& on) { return s->generate(r.options, on); });
}

void expect_same(const Output& got, const Output& want, const std::string& what) {
  ASSERT_TRUE(want.result.ok()) << what << ": " << want.result.status().to_string();
  ASSERT_TRUE(got.result.ok()) << what << ": " << got.result.status().to_string();
  EXPECT_EQ(got.ids, want.ids) << what;
  EXPECT_EQ(got.text, want.text) << what;
  EXPECT_EQ(got.result->finish, want.result->finish) << what;
  EXPECT_EQ(got.result->tokens, want.result->tokens) << what;
  ASSERT_EQ(got.logprobs.size(), want.logprobs.size()) << what;
  for (size_t i = 0; i < got.logprobs.size(); ++i) {
    EXPECT_EQ(got.logprobs[i].id, want.logprobs[i].id) << what << " entry " << i;
    EXPECT_EQ(got.logprobs[i].logprob, want.logprobs[i].logprob) << what << " entry " << i;
    EXPECT_EQ(got.logprobs[i].top.size(), want.logprobs[i].top.size()) << what << " entry " << i;
  }
}

// Requests of every kind: prompts shorter and longer than the tiny model's window (8) and
// prefill chunk, greedy and seeded sampling, stop strings, logprobs, max_tokens 0 and 1.
std::vector<EngineRequest> mixed_requests(int n) {
  const char* texts[] = {"Once upon a time",
                         "The",
                         "In a hole in the ground there lived a hobbit, not a nasty dirty wet hole",
                         "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30",
                         "Hello there, general",
                         "abc"};
  std::vector<EngineRequest> rs;
  for (int i = 0; i < n; ++i) {
    EngineRequest r;
    if (i % 5 == 3)
      r.messages = {{"user", texts[i % 6]}};
    else if (i % 5 == 4)
      r.tokens = {2, 10 + i, 20 + i, 30 + i};
    else
      r.text = texts[i % 6];
    r.options.max_tokens = 4 + 7 * (i % 4);
    if (i % 6 == 1) {
      r.options.sampling.temperature = 0.9f;
      r.options.sampling.top_k = 40;
      r.options.sampling.seed = 100 + i;
    }
    if (i % 7 == 2) r.options.stop_strings = {"e", "th"};
    if (i % 4 == 1) r.options.top_logprobs = 3;
    if (i == 5) r.options.max_tokens = 0;
    if (i == 6) r.options.max_tokens = 1;
    rs.push_back(r);
  }
  return rs;
}

// Submits every request at once, waits for all, returns their outputs in order.
std::vector<Output> run_all(Engine& e, const std::vector<EngineRequest>& rs) {
  std::vector<Output> outs(rs.size());
  std::mutex mu;
  std::condition_variable cv;
  size_t done = 0;
  for (size_t i = 0; i < rs.size(); ++i) {
    Output* o = &outs[i];
    auto id = e.submit(
        rs[i],
        [o](const TokenEvent& ev) {
          o->text += ev.text;
          if (ev.id >= 0) o->ids.push_back(ev.id);
          o->logprobs.insert(o->logprobs.end(), ev.logprobs.begin(), ev.logprobs.end());
          return true;
        },
        [&, o](const Result<GenerateResult>& r) {
          std::lock_guard<std::mutex> lock(mu);
          o->result = r;
          ++done;
          cv.notify_all();
        });
    EXPECT_TRUE(id.ok()) << id.status().to_string();
    if (!id.ok()) {
      std::lock_guard<std::mutex> lock(mu);
      ++done;
    }
  }
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return done == rs.size(); });
  return outs;
}

TEST(Engine, BatchedGreedyAndSeededOutputsEqualLoneSessions) {
  auto m = load(testutil::data_path("tiny"), 128, /*invariant=*/true);
  ASSERT_TRUE(m);
  const auto rs = mixed_requests(11);
  // 4 sequences for 11 requests: requests wait, join running batches, finish at different steps;
  // a 12-token step budget splits prompts into chunks beside decode tokens.
  EngineOptions eo;
  eo.max_sequences = 4;
  eo.step_tokens = 12;
  auto e = Engine::create(m, eo);
  ASSERT_TRUE(e.ok()) << e.status().to_string();
  const std::vector<Output> got = run_all(**e, rs);
  for (size_t i = 0; i < rs.size(); ++i)
    expect_same(got[i], reference(*m, rs[i]), "request " + std::to_string(i));
  const EngineStats st = (*e)->stats();
  EXPECT_EQ(st.finished, rs.size());
  EXPECT_EQ(st.running, 0);
  EXPECT_EQ(st.queued, 0);
  EXPECT_GT(st.steps, 0u);
  EXPECT_EQ(st.kv_used_tokens, 0u);
  // Fewer steps than the requests' tokens run one at a time: steps were shared.
  uint64_t tokens = st.prompt_tokens + st.generated_tokens;
  EXPECT_LT(st.steps, tokens / 2) << "steps " << st.steps << " for " << tokens << " tokens";
}

TEST(Engine, OneSequenceAndDefaultStepAlsoMatch) {
  auto m = load(testutil::data_path("tiny"), 128, /*invariant=*/true);
  ASSERT_TRUE(m);
  const auto rs = mixed_requests(5);
  EngineOptions eo;
  eo.max_sequences = 1;
  auto e = Engine::create(m, eo);
  ASSERT_TRUE(e.ok()) << e.status().to_string();
  const std::vector<Output> got = run_all(**e, rs);
  for (size_t i = 0; i < rs.size(); ++i)
    expect_same(got[i], reference(*m, rs[i]), "request " + std::to_string(i));
}

TEST(Engine, ContextFullFinishesOneSequence) {
  auto m = load(testutil::data_path("tiny"), 64, /*invariant=*/true);
  ASSERT_TRUE(m);
  EngineOptions eo;
  eo.max_sequences = 2;
  eo.context = 24;
  auto e = Engine::create(m, eo);
  ASSERT_TRUE(e.ok()) << e.status().to_string();
  EngineRequest full, other;
  full.text = "Once upon a time";
  full.options.max_tokens = -1;
  other.text = "The";
  other.options.max_tokens = 6;
  const std::vector<Output> got = run_all(**e, {full, other});
  ASSERT_TRUE(got[0].result.ok()) << got[0].result.status().to_string();
  ASSERT_TRUE(got[1].result.ok()) << got[1].result.status().to_string();
  if (got[0].result->finish != FinishReason::kStopToken) {
    EXPECT_EQ(got[0].result->finish, FinishReason::kContextFull);
  }
  EXPECT_EQ(got[1].result->finish, FinishReason::kMaxTokens);
  // The same as a lone session of the engine's context.
  SessionOptions so;
  so.context = 24;
  auto s = m->new_session(so).value();
  ASSERT_TRUE(s->feed_text(full.text).ok());
  const Output want = collect([&](const Engine::OnToken& on) { return s->generate(full.options, on); });
  expect_same(got[0], want, "context-full request");
}

TEST(Engine, CancelInTheMiddleLeavesTheOthersUntouched) {
  auto m = load(testutil::data_path("tiny"), 128, /*invariant=*/true);
  ASSERT_TRUE(m);
  EngineOptions eo;
  eo.max_sequences = 4;
  auto e = Engine::create(m, eo);
  ASSERT_TRUE(e.ok());
  auto rs = mixed_requests(4);
  for (auto& r : rs) r.options.max_tokens = 30, r.options.stop_strings.clear();
  std::atomic<bool> stop{false};
  rs[1].options.cancel = &stop;
  std::vector<Output> outs(rs.size());
  std::mutex mu;
  std::condition_variable cv;
  size_t done = 0;
  std::atomic<uint64_t> cancel_id{0};
  for (size_t i = 0; i < rs.size(); ++i) {
    Output* o = &outs[i];
    auto id = (*e)->submit(
        rs[i],
        [&, o, i](const TokenEvent& ev) {
          o->text += ev.text;
          if (ev.id >= 0) o->ids.push_back(ev.id);
          if (i == 1 && o->ids.size() == 3) stop = true;                     // by its flag
          if (i == 2 && o->ids.size() == 5) (*e)->cancel(cancel_id.load());  // by Engine::cancel
          return true;
        },
        [&, o](const Result<GenerateResult>& r) {
          std::lock_guard<std::mutex> lock(mu);
          o->result = r;
          ++done;
          cv.notify_all();
        });
    ASSERT_TRUE(id.ok());
    if (i == 2) cancel_id = *id;
  }
  {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return done == rs.size(); });
  }
  for (size_t i : {size_t{1}, size_t{2}}) {
    ASSERT_TRUE(outs[i].result.ok()) << outs[i].result.status().to_string();
    EXPECT_EQ(outs[i].result->finish, FinishReason::kCancelled) << "request " << i;
  }
  EXPECT_EQ(outs[1].ids.size(), 3u);
  // Engine::cancel may land before the step after the 5th token or at the one after it.
  EXPECT_GE(outs[2].ids.size(), 5u);
  EXPECT_LE(outs[2].ids.size(), 6u);
  for (size_t i : {size_t{0}, size_t{3}}) {
    EngineRequest r = rs[i];
    expect_same(outs[i], reference(*m, r), "request " + std::to_string(i));
  }
}

// A server's gauges read stats(): cancelling the only running request must bring them to zero
// (they once kept its values until the next request arrived).
TEST(Engine, CancellingTheOnlyRequestClearsTheGauges) {
  auto m = load(testutil::data_path("tiny"), 128, /*invariant=*/true);
  ASSERT_TRUE(m);
  auto e = Engine::create(m, {});
  ASSERT_TRUE(e.ok());
  EngineRequest r;
  r.text = "Once upon a time";
  r.options.max_tokens = 100;
  r.options.ignore_eos = true;
  std::atomic<uint64_t> id{0};
  std::atomic<int> tokens{0};
  auto done = std::make_shared<std::promise<Result<GenerateResult>>>();
  auto sub = (*e)->submit(
      r,
      [&](const TokenEvent&) {
        // From the second token on, once submit has returned the id (the engine's thread may
        // stream tokens before the submitting thread stores it; ids start at 1).
        if (++tokens >= 2 && id.load() != 0) (*e)->cancel(id.load());
        return true;
      },
      [done](const Result<GenerateResult>& res) { done->set_value(res); });
  ASSERT_TRUE(sub.ok());
  id = *sub;
  const Result<GenerateResult> res = done->get_future().get();
  ASSERT_TRUE(res.ok());
  EXPECT_EQ(res->finish, FinishReason::kCancelled);
  EngineStats s = (*e)->stats();
  for (int i = 0; i < 200 && (s.running != 0 || s.kv_used_tokens != 0); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    s = (*e)->stats();
  }
  EXPECT_EQ(s.running, 0);
  EXPECT_EQ(s.kv_used_tokens, 0u);
}

TEST(Engine, ManyThreadsSubmitAtOnce) {
  auto m = load(testutil::data_path("tiny"), 128, /*invariant=*/true);
  ASSERT_TRUE(m);
  EngineOptions eo;
  eo.max_sequences = 3;
  auto e = Engine::create(m, eo);
  ASSERT_TRUE(e.ok());
  const auto rs = mixed_requests(8);
  std::vector<Output> outs(rs.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < rs.size(); ++i)
    threads.emplace_back([&, i] {
      outs[i] = collect([&](const Engine::OnToken& on) { return (*e)->generate(rs[i], on); });
      (void)(*e)->stats();
    });
  for (auto& t : threads) t.join();
  for (size_t i = 0; i < rs.size(); ++i)
    expect_same(outs[i], reference(*m, rs[i]), "thread " + std::to_string(i));
}

TEST(Engine, FullQueueIsUnavailableAndShutdownCancelsTheRest) {
  auto m = load(testutil::data_path("tiny"), 64, /*invariant=*/false, 1);
  ASSERT_TRUE(m);
  EngineOptions eo;
  eo.max_sequences = 1;
  eo.max_queued = 1;
  auto e = Engine::create(m, eo);
  ASSERT_TRUE(e.ok());
  std::mutex mu;
  std::condition_variable cv;
  bool started = false, release = false;
  std::vector<Result<GenerateResult>> results;
  auto on_done = [&](const Result<GenerateResult>& r) {
    std::lock_guard<std::mutex> lock(mu);
    results.push_back(r);
  };
  EngineRequest r;
  r.text = "Once upon a time";
  r.options.max_tokens = 50;
  // The first request holds the only sequence (and the engine's thread) in its callback.
  ASSERT_TRUE((*e)->submit(
                      r,
                      [&](const TokenEvent&) {
                        std::unique_lock<std::mutex> lock(mu);
                        started = true;
                        cv.notify_all();
                        cv.wait(lock, [&] { return release; });
                        return true;
                      },
                      on_done)
                  .ok());
  {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return started; });
  }
  auto noop = [](const TokenEvent&) { return true; };
  ASSERT_TRUE((*e)->submit(r, noop, on_done).ok());  // waits in the queue
  auto refused = (*e)->submit(r, noop, on_done);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), ErrorCode::kUnavailable);
  EXPECT_NE(refused.status().message().find("max_queued"), std::string::npos) << refused.status().message();
  EXPECT_EQ((*e)->stats().queued, 1);
  {
    std::lock_guard<std::mutex> lock(mu);
    release = true;
    cv.notify_all();
  }
  e->reset();  // cancels the running and the queued request
  ASSERT_EQ(results.size(), 2u);
  for (const auto& res : results) {
    ASSERT_TRUE(res.ok()) << res.status().to_string();
    EXPECT_EQ(res->finish, FinishReason::kCancelled);
  }
}

// The memory planner's numbers for N sequences (gemma3 info --parallel N) are what the engine
// reserves.
TEST(Engine, KvMemoryIsWhatThePlannerSays) {
  auto m = load(testutil::data_path("tiny"), 128, /*invariant=*/false, 1);
  ASSERT_TRUE(m);
  for (const int n : {1, 3, 40}) {
    EngineOptions eo;
    eo.max_sequences = n;
    auto e = Engine::create(m, eo);
    ASSERT_TRUE(e.ok()) << e.status().to_string();
    PlanOptions po;
    po.context = 128;
    po.sequences = n;
    po.kv_tokens = n * 128;  // an Engine's plan, also for n = 1 (not a session's)
    po.prefill_chunk = m->memory_plan().prefill_chunk;
    auto info = inspect(testutil::data_path("tiny"), po);
    ASSERT_TRUE(info.ok()) << info.status().to_string();
    EXPECT_EQ(info->memory.sequences, n);
    EXPECT_EQ(info->memory.kv_checkpoint_bytes, info->memory.kv_local_bytes) << n;  // the rings again
    EXPECT_EQ((*e)->stats().kv_bytes,
              info->memory.kv_global_bytes + info->memory.kv_local_bytes + info->memory.kv_checkpoint_bytes)
        << n;
    EXPECT_EQ((*e)->stats().kv_capacity_tokens, uint64_t(n) * 128);
  }
  PlanOptions bad;
  bad.sequences = 0;
  auto info = inspect(testutil::data_path("tiny"), bad);
  ASSERT_FALSE(info.ok());
  EXPECT_NE(info.status().message().find("PlanOptions::sequences"), std::string::npos);
}

TEST(Engine, BadRequestsAreRefusedNamingTheField) {
  auto m = load(testutil::data_path("tiny"), 32, /*invariant=*/false, 1);
  ASSERT_TRUE(m);
  EngineOptions eo;
  eo.max_sequences = 2;
  auto e = Engine::create(m, eo);
  ASSERT_TRUE(e.ok());
  auto noop = [](const TokenEvent&) { return true; };
  auto done = [](const Result<GenerateResult>&) { ADD_FAILURE() << "on_done of a refused request"; };
  auto refuse = [&](const EngineRequest& r, ErrorCode code, const std::string& words) {
    auto id = (*e)->submit(r, noop, done);
    ASSERT_FALSE(id.ok()) << words;
    EXPECT_EQ(id.status().code(), code) << id.status().to_string();
    EXPECT_NE(id.status().message().find(words), std::string::npos) << id.status().message();
  };
  refuse({}, ErrorCode::kInvalidArgument, "exactly one of tokens, text and messages");
  EngineRequest two;
  two.text = "a";
  two.tokens = {2};
  refuse(two, ErrorCode::kInvalidArgument, "exactly one of");
  EngineRequest hot;
  hot.text = "a";
  hot.options.sampling.temperature = -1;
  refuse(hot, ErrorCode::kInvalidArgument, "SamplingOptions::temperature");
  EngineRequest id;
  id.tokens = {2, 100000};
  refuse(id, ErrorCode::kInvalidArgument, "EngineRequest::tokens[1]");
  EngineRequest image;  // a text-only model
  image.messages = {{"user", "look", {"x.png"}}};
  refuse(image, ErrorCode::kUnsupported, "no vision tower");
  image.messages = {{"user", "look", {}, {"\x89PNG"}}};
  refuse(image, ErrorCode::kUnsupported, "EngineRequest::messages");
  EngineRequest longer;
  longer.tokens.assign(33, 2);
  refuse(longer, ErrorCode::kOutOfRange, "at most 32");

  EngineOptions bad;
  bad.max_sequences = 0;
  auto no = Engine::create(m, bad);
  ASSERT_FALSE(no.ok());
  EXPECT_NE(no.status().message().find("EngineOptions::max_sequences"), std::string::npos);
  bad = {};
  bad.step_tokens = 2;
  bad.max_sequences = 4;
  no = Engine::create(m, bad);
  ASSERT_FALSE(no.ok());
  EXPECT_NE(no.status().message().find("EngineOptions::step_tokens"), std::string::npos);
  EXPECT_FALSE(Engine::create(nullptr, {}).ok());
}

TEST(Engine, ACallbackThatThrowsFailsOnlyItsRequest) {
  auto m = load(testutil::data_path("tiny"), 64, /*invariant=*/true);
  ASSERT_TRUE(m);
  EngineOptions eo;
  eo.max_sequences = 2;
  auto e = Engine::create(m, eo);
  ASSERT_TRUE(e.ok());
  EngineRequest bad, good;
  bad.text = "The";
  good.text = "Once upon a time";
  bad.options.max_tokens = good.options.max_tokens = 12;
  std::thread t([&] {
    auto r = (*e)->generate(bad, [](const TokenEvent&) -> bool { throw std::runtime_error("boom"); });
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.status().message().find("boom"), std::string::npos) << r.status().to_string();
  });
  const Output got = collect([&](const Engine::OnToken& on) { return (*e)->generate(good, on); });
  t.join();
  expect_same(got, reference(*m, good), "the other request");
}

// Prefix reuse: a request that continues a finished one (its prompt, its reply, more tokens)
// runs only the new tokens, one that diverges a few tokens before the old end too, one that
// diverges further back than the rings keep does not; all give what a fresh session gives.
TEST(Engine, PrefixReuseGivesWhatAFreshRunGives) {
  auto m = load(testutil::data_path("tiny"), 256, /*invariant=*/true);
  ASSERT_TRUE(m);
  EngineOptions eo;
  eo.max_sequences = 2;
  eo.step_tokens = 8;  // rings of W + 8 - 1 = 15 slots: reuse only within 8 tokens of the old end
  auto e = Engine::create(m, eo);
  ASSERT_TRUE(e.ok());
  auto run = [&](const EngineRequest& r) {
    return collect([&](const Engine::OnToken& on) { return (*e)->generate(r, on); });
  };
  EngineRequest a;
  for (int i = 0; i < 30; ++i) a.tokens.push_back(i == 0 ? 2 : 300 + (i * 37) % 150);
  a.options.max_tokens = 12;
  a.options.ignore_eos = true;
  const Output first = run(a);
  expect_same(first, reference(*m, a), "first request");
  ASSERT_EQ(first.ids.size(), 12u);
  EXPECT_EQ(first.result->prompt_tokens, static_cast<int>(a.tokens.size()));
  EXPECT_EQ(first.result->cached_tokens, 0);
  // Held by the sequence: the prompt and every generated id but the last (never fed).
  std::vector<int32_t> held = a.tokens;
  held.insert(held.end(), first.ids.begin(), first.ids.end() - 1);

  EngineRequest next = a;  // the next turn: everything so far, then new tokens
  next.tokens.insert(next.tokens.end(), first.ids.begin(), first.ids.end());
  for (int i = 0; i < 9; ++i) next.tokens.push_back(200 + i);
  uint64_t before = (*e)->stats().reused_tokens;
  const Output second = run(next);
  expect_same(second, reference(*m, next), "next turn");
  EXPECT_EQ((*e)->stats().reused_tokens - before, held.size());
  EXPECT_EQ(second.result->prompt_tokens,
            static_cast<int>(next.tokens.size()));  // usage as a server reports it
  EXPECT_EQ(second.result->cached_tokens, static_cast<int>(held.size()));
  held = next.tokens;  // now held, minus the reply's last id
  // (the reply to `next` went into the same sequence; rebuild what it holds from a lone run)
  const Output next_out = reference(*m, next);
  held.insert(held.end(), next_out.ids.begin(), next_out.ids.end() - 1);

  EngineRequest near = next;  // diverges 5 tokens before the old end: the rings still hold it
  near.tokens.assign(held.begin(), held.end() - 5);
  near.tokens.insert(near.tokens.end(), {250, 251, 252});
  before = (*e)->stats().reused_tokens;
  expect_same(run(near), reference(*m, near), "diverging near the end");
  EXPECT_EQ((*e)->stats().reused_tokens - before, held.size() - 5);

  EngineRequest far = a;  // diverges 30+ tokens back: rebuilt from the start
  far.tokens.assign(a.tokens.begin(), a.tokens.begin() + 20);
  far.tokens.insert(far.tokens.end(), {260, 261, 262, 263});
  before = (*e)->stats().reused_tokens;
  expect_same(run(far), reference(*m, far), "diverging far back");
  EXPECT_EQ((*e)->stats().reused_tokens - before, 0u);
}

// The bound: with a step of U = 8 tokens the rings keep the window before a divergence 8
// tokens back from the old end, not 9.
TEST(Engine, PrefixReuseBoundIsTheStepSize) {
  auto m = load(testutil::data_path("tiny"), 256, /*invariant=*/true);
  ASSERT_TRUE(m);
  for (const size_t back : {size_t{8}, size_t{9}}) {
    EngineOptions eo;
    eo.max_sequences = 1;
    eo.step_tokens = 8;
    auto e = Engine::create(m, eo);
    ASSERT_TRUE(e.ok());
    EngineRequest a;
    for (int i = 0; i < 30; ++i) a.tokens.push_back(i == 0 ? 2 : 300 + (i * 41) % 150);
    a.options.max_tokens = 12;
    a.options.ignore_eos = true;
    const Output first = collect([&](const Engine::OnToken& on) { return (*e)->generate(a, on); });
    ASSERT_EQ(first.ids.size(), 12u);
    std::vector<int32_t> held = a.tokens;
    held.insert(held.end(), first.ids.begin(), first.ids.end() - 1);
    EngineRequest b = a;
    b.tokens.assign(held.begin(), held.end() - static_cast<std::ptrdiff_t>(back));
    b.tokens.insert(b.tokens.end(), {250, 251, 252});
    const Output got = collect([&](const Engine::OnToken& on) { return (*e)->generate(b, on); });
    expect_same(got, reference(*m, b), "diverging " + std::to_string(back) + " back");
    EXPECT_EQ((*e)->stats().reused_tokens, back <= 8 ? held.size() - back : 0u) << back;
  }
}

// Ring checkpoints: prompts sharing a system prompt and differing after it (a new question)
// reuse the shared part from the checkpoint taken at the end of the last prompt, when they
// diverge at most a step (U = 8) before that end; 9 before, and without checkpoints, they do
// not; every output equals a fresh run.
TEST(Engine, RingCheckpointReusesASharedSystemPrompt) {
  auto m = load(testutil::data_path("tiny"), 256, /*invariant=*/true);
  ASSERT_TRUE(m);
  std::vector<int32_t> system;
  for (int i = 0; i < 30; ++i) system.push_back(i == 0 ? 2 : 300 + (i * 29) % 150);
  auto ask = [&](int question, int n) {
    EngineRequest r;
    r.tokens = system;
    for (int i = 0; i < n; ++i) r.tokens.push_back(100 + 10 * question + i);
    r.options.max_tokens = 12;  // the reply takes the live rings far past the system prompt
    r.options.ignore_eos = true;
    return r;
  };
  for (const bool checkpoints : {true, false}) {
    EngineOptions eo;
    eo.max_sequences = 1;
    eo.step_tokens = 8;  // rings of W + 8 - 1 = 15 slots
    eo.ring_checkpoints = checkpoints;
    auto e = Engine::create(m, eo);
    ASSERT_TRUE(e.ok()) << e.status().to_string();
    auto run = [&](const EngineRequest& r) {
      return collect([&](const Engine::OnToken& on) { return (*e)->generate(r, on); });
    };
    const std::string what = checkpoints ? "with checkpoints" : "without";
    expect_same(run(ask(0, 5)), reference(*m, ask(0, 5)), what + ": first");
    // {question, its tokens after the system prompt, reused with checkpoints}: each reuses the
    // system prompt when the last prompt ended at most U = 8 tokens past it (0 ended 5 past,
    // 1 ended 8 past, 2 ended 9 past: 3 runs from the start, 3 ended 4 past).
    for (const auto& [question, n, reused] :
         {std::tuple{1, 8, 30}, std::tuple{2, 9, 30}, std::tuple{3, 4, 0}, std::tuple{4, 3, 30}}) {
      const EngineRequest r = ask(question, n);
      const uint64_t before = (*e)->stats().reused_tokens;
      const Output got = run(r);
      expect_same(got, reference(*m, r), what + ": question " + std::to_string(question));
      const int want = checkpoints ? reused : 0;
      EXPECT_EQ((*e)->stats().reused_tokens - before, static_cast<uint64_t>(want))
          << what << " question " << question;
      EXPECT_EQ(got.result->cached_tokens, want) << what << " question " << question;
    }
  }
}

// A request sharing a system prompt with one running now copies that sequence's prefix (its
// global positions and its ring checkpoint) instead of running it again, and both give what a
// fresh run gives.
TEST(Engine, ARunningRequestsSystemPromptIsCopied) {
  auto m = load(testutil::data_path("tiny"), 256, /*invariant=*/true);
  ASSERT_TRUE(m);
  EngineOptions eo;
  eo.max_sequences = 3;
  eo.step_tokens = 8;
  auto e = Engine::create(m, eo);
  ASSERT_TRUE(e.ok()) << e.status().to_string();
  std::vector<int32_t> system;
  for (int i = 0; i < 60; ++i) system.push_back(i == 0 ? 2 : 300 + (i * 23) % 150);
  EngineRequest a, b;
  a.tokens = b.tokens = system;
  a.tokens.insert(a.tokens.end(), {101, 102, 103, 104});
  b.tokens.insert(b.tokens.end(), {111, 112, 113, 114, 115});
  a.options.max_tokens = 30;
  a.options.ignore_eos = b.options.ignore_eos = true;
  b.options.max_tokens = 10;
  b.options.top_logprobs = 2;  // exact logprobs: any difference in the copied KV shows
  // a's first token (its prompt and checkpoint done) holds the engine until b is queued.
  std::promise<void> a_started, b_queued;
  std::shared_future<void> queued = b_queued.get_future().share();
  bool first = true;
  Output got_a;
  auto a_done = std::async(std::launch::async, [&] {
    return collect([&](const Engine::OnToken& on) {
      return (*e)->generate(a, [&](const TokenEvent& ev) {
        if (std::exchange(first, false)) {
          a_started.set_value();
          queued.wait();
        }
        return on(ev);
      });
    });
  });
  a_started.get_future().wait();
  std::promise<Result<GenerateResult>> b_result;
  Output got_b;
  auto id = (*e)->submit(
      b,
      [&](const TokenEvent& ev) {
        got_b.text += ev.text;
        if (ev.id >= 0) got_b.ids.push_back(ev.id);
        got_b.logprobs.insert(got_b.logprobs.end(), ev.logprobs.begin(), ev.logprobs.end());
        return true;
      },
      [&](const Result<GenerateResult>& r) { b_result.set_value(r); });
  ASSERT_TRUE(id.ok()) << id.status().to_string();
  b_queued.set_value();
  got_b.result = b_result.get_future().get();
  got_a = a_done.get();
  expect_same(got_a, reference(*m, a), "a");
  expect_same(got_b, reference(*m, b), "b");
  EXPECT_EQ(got_b.result->cached_tokens, 60);
  EXPECT_EQ((*e)->stats().copied_tokens, 60u);
}

// A burst of requests with the same 60-token system prompt, queued together (a first request
// holds the engine until they are): the first runs the prefix, the others wait for its prompt
// to finish and copy it, instead of all computing it in the same steps; every output (with
// exact logprobs) equals a fresh run's.
TEST(Engine, ABurstSharingASystemPromptComputesItOnce) {
  auto m = load(testutil::data_path("tiny"), 256, /*invariant=*/true);
  ASSERT_TRUE(m);
  EngineOptions eo;
  eo.max_sequences = 5;
  eo.step_tokens = 8;
  auto e = Engine::create(m, eo);
  ASSERT_TRUE(e.ok()) << e.status().to_string();
  EngineRequest hold;
  hold.tokens = {2, 410, 411, 412};
  hold.options.max_tokens = 12;
  hold.options.ignore_eos = true;
  std::promise<void> held, queued;
  std::shared_future<void> all_queued = queued.get_future().share();
  bool first = true;
  auto hold_done = std::async(std::launch::async, [&] {
    return collect([&](const Engine::OnToken& on) {
      return (*e)->generate(hold, [&](const TokenEvent& ev) {
        if (std::exchange(first, false)) {
          held.set_value();
          all_queued.wait();
        }
        return on(ev);
      });
    });
  });
  held.get_future().wait();
  std::vector<int32_t> system;
  for (int i = 0; i < 60; ++i) system.push_back(i == 0 ? 2 : 300 + (i * 29) % 150);
  std::vector<EngineRequest> burst(4);
  std::vector<Output> got(burst.size());
  std::vector<std::promise<Result<GenerateResult>>> results(burst.size());
  for (size_t r = 0; r < burst.size(); ++r) {
    burst[r].tokens = system;
    for (int i = 0; i < 3; ++i) burst[r].tokens.push_back(static_cast<int32_t>(100 + 10 * r + i));
    burst[r].options.max_tokens = 6;
    burst[r].options.ignore_eos = true;
    burst[r].options.top_logprobs = 2;  // exact logprobs: any difference in the copied KV shows
    Output* o = &got[r];
    auto id = (*e)->submit(
        burst[r],
        [o](const TokenEvent& ev) {
          o->text += ev.text;
          if (ev.id >= 0) o->ids.push_back(ev.id);
          o->logprobs.insert(o->logprobs.end(), ev.logprobs.begin(), ev.logprobs.end());
          return true;
        },
        [&results, r](const Result<GenerateResult>& res) { results[r].set_value(res); });
    ASSERT_TRUE(id.ok()) << id.status().to_string();
  }
  queued.set_value();
  for (size_t r = 0; r < burst.size(); ++r) got[r].result = results[r].get_future().get();
  expect_same(hold_done.get(), reference(*m, hold), "hold");
  for (size_t r = 0; r < burst.size(); ++r) {
    expect_same(got[r], reference(*m, burst[r]), "burst request " + std::to_string(r));
    EXPECT_EQ(got[r].result->cached_tokens, r == 0 ? 0 : 60) << "burst request " << r;
  }
  EXPECT_EQ((*e)->stats().copied_tokens, 3u * 60u);
}

// ---- paged KV (engine.h, "Paged KV") ----

// Long requests through a pool of one context's pages: they wait for pages, the requests
// admitted last are preempted when a decoding sequence needs a page, and every request still
// gives what a lone session gives (greedy, seeded, logprobs); the pages held never exceed the
// pool.
TEST(EnginePages, RunningOutPreemptsAndOutputsStillEqualLoneSessions) {
  auto m = load(testutil::data_path("tiny"), 256, /*invariant=*/true);
  ASSERT_TRUE(m);
  EngineOptions eo;
  eo.max_sequences = 4;
  eo.step_tokens = 32;
  eo.kv_tokens = 256;
  auto e = Engine::create(m, eo);
  ASSERT_TRUE(e.ok()) << e.status().to_string();
  const EngineStats st = (*e)->stats();
  ASSERT_GT(st.kv_page_tokens, 0);
  EXPECT_EQ(st.kv_pages, (256 + st.kv_page_tokens - 1) / st.kv_page_tokens);
  EXPECT_EQ(st.kv_capacity_tokens, uint64_t(st.kv_pages) * st.kv_page_tokens);
  std::vector<EngineRequest> rs;
  for (int i = 0; i < 6; ++i) {  // 6 x (20..70 prompt + 60..110 generated) tokens, > 2 pools
    EngineRequest r;
    for (int j = 0; j < 20 + 10 * i; ++j) r.tokens.push_back(j == 0 ? 2 : 100 + (j * 31 + i * 7) % 300);
    r.options.max_tokens = 110 - 10 * i;
    r.options.ignore_eos = true;
    if (i == 1) {
      r.options.sampling.temperature = 0.9f;
      r.options.sampling.seed = 7;
    }
    if (i == 2) r.options.top_logprobs = 2;
    rs.push_back(r);
  }
  std::atomic<bool> done{false};
  std::atomic<int> most{0};
  std::thread watch([&] {
    while (!done) {
      most = std::max(most.load(), (*e)->stats().kv_pages_used);
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  });
  const std::vector<Output> outs = run_all(**e, rs);
  done = true;
  watch.join();
  for (size_t i = 0; i < rs.size(); ++i) {
    expect_same(outs[i], reference(*m, rs[i]), "request " + std::to_string(i));
    EXPECT_EQ(outs[i].result->prompt_tokens, static_cast<int>(rs[i].tokens.size())) << i;
  }
  EXPECT_GT((*e)->stats().preempted, 0u);
  EXPECT_LE(most.load(), st.kv_pages);
  EXPECT_GT(most.load(), 0);
}

// An idle sequence's kept prefix holds pages until a request needs them: then it is dropped
// (no reuse of it afterwards), while a prefix whose pages were not needed is still reused.
TEST(EnginePages, IdlePrefixesGiveTheirPagesBack) {
  auto m = load(testutil::data_path("tiny"), 256, /*invariant=*/true);
  ASSERT_TRUE(m);
  EngineOptions eo;
  eo.max_sequences = 2;
  eo.kv_tokens = 256;
  auto e = Engine::create(m, eo);
  ASSERT_TRUE(e.ok()) << e.status().to_string();
  auto run = [&](const EngineRequest& r) {
    return collect([&](const Engine::OnToken& on) { return (*e)->generate(r, on); });
  };
  auto prompt = [](int n, int salt) {
    EngineRequest r;
    for (int j = 0; j < n; ++j) r.tokens.push_back(100 + (j * 13 + salt) % 300);  // no common first token
    r.options.max_tokens = 4;
    r.options.ignore_eos = true;
    return r;
  };
  const EngineRequest a = prompt(180, 1), b = prompt(150, 2);
  expect_same(run(a), reference(*m, a), "a");
  const int page = (*e)->stats().kv_page_tokens;
  for (int i = 0; i < 200 && (*e)->stats().kv_pages_used != 0; ++i)  // the gauges follow the step
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ((*e)->stats().kv_pages_used, 0);   // idle pages are not "used"
  expect_same(run(b), reference(*m, b), "b");  // needs a's pages: a's prefix is dropped
  EngineRequest a2 = a;                        // a's next turn: nothing left to reuse
  a2.tokens.push_back(42);
  uint64_t before = (*e)->stats().reused_tokens;
  expect_same(run(a2), reference(*m, a2), "a again");
  EXPECT_EQ((*e)->stats().reused_tokens, before);
  const EngineRequest small = prompt(20, 3);  // fits beside a2's pages
  expect_same(run(small), reference(*m, small), "small");
  EngineRequest a3 = a2;  // a2's prefix was kept: reused
  a3.tokens.push_back(43);
  before = (*e)->stats().reused_tokens;
  expect_same(run(a3), reference(*m, a3), "a2's next turn");
  EXPECT_EQ((*e)->stats().reused_tokens - before, a2.tokens.size());
  EXPECT_GT(page, 0);
}

TEST(EnginePages, PoolSmallerThanAContextIsRefused) {
  auto m = load(testutil::data_path("tiny"), 256, /*invariant=*/false);
  ASSERT_TRUE(m);
  for (const int64_t kv : {int64_t{-1}, int64_t{255}}) {
    EngineOptions eo;
    eo.kv_tokens = kv;
    auto e = Engine::create(m, eo);
    ASSERT_FALSE(e.ok()) << kv;
    EXPECT_EQ(e.status().code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(e.status().message().find("EngineOptions::kv_tokens"), std::string::npos)
        << e.status().message();
  }
  EngineOptions eo;
  eo.max_sequences = 8;
  eo.kv_tokens = 300;  // 8 sequences of 256 share 300 positions (rounded up to pages)
  auto e = Engine::create(m, eo);
  ASSERT_TRUE(e.ok()) << e.status().to_string();
  const EngineStats st = (*e)->stats();
  EXPECT_EQ(st.kv_pages, (300 + st.kv_page_tokens - 1) / st.kv_page_tokens);
  PlanOptions po;
  po.context = 256;
  po.sequences = 8;
  po.kv_tokens = 300;
  po.prefill_chunk = m->memory_plan().prefill_chunk;
  auto info = inspect(testutil::data_path("tiny"), po);
  ASSERT_TRUE(info.ok()) << info.status().to_string();
  EXPECT_EQ(info->memory.kv_pages, st.kv_pages);
  EXPECT_EQ(st.kv_bytes,
            info->memory.kv_global_bytes + info->memory.kv_local_bytes + info->memory.kv_checkpoint_bytes);
  EXPECT_EQ(info->memory.kv_global_bytes, uint64_t(st.kv_pages) * info->memory.kv_page_bytes);
  po.sequences = 1;
  po.kv_tokens = 0;
  auto one = inspect(testutil::data_path("tiny"), po);  // a session: one whole context
  ASSERT_TRUE(one.ok()) << one.status().to_string();
  EXPECT_EQ(one->memory.kv_pages, 0);
  EXPECT_LT(info->memory.kv_global_bytes, 2 * one->memory.kv_global_bytes);  // not 8 contexts
}

// ---- images (tests/data/tiny-vision: 64x64 images, 16 soft tokens each) ----

constexpr int32_t kImageToken = 512;  // image_token_index, tests/data/tiny-vision/config.json

std::string image_file(const std::string& name) { return testutil::data_path("images/" + name); }

std::string file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

std::shared_ptr<Model> load_vision(int chunk = 64) {
  LoadOptions o;
  o.backend = BackendKind::kCpu;
  o.threads = 2;
  o.context = 256;
  o.prefill_chunk = chunk;
  o.batch_invariant = true;
  auto m = Model::load(testutil::data_path("tiny-vision"), o);
  EXPECT_TRUE(m.ok()) << m.status().to_string();
  return m.ok() ? *m : nullptr;
}

// Session::feed_chat takes images as bytes in memory: the same context as the file, and the
// same bytes again come from the session's image cache.
TEST(EngineImages, SessionFeedChatTakesImageBytes) {
  auto m = load_vision();
  ASSERT_TRUE(m);
  const std::string file = image_file("rgb_300x90.png");
  auto by_path = m->new_session().value();
  ASSERT_TRUE(by_path->feed_chat({{"user", "What is this?", {file}}}).ok());
  auto by_bytes = m->new_session().value();
  Status st = by_bytes->feed_chat({{"user", "What is this?", {}, {file_bytes(file)}}});
  ASSERT_TRUE(st.ok()) << st.to_string();
  EXPECT_EQ(by_bytes->tokens(), by_path->tokens());
  EXPECT_EQ(testutil::to_vector(by_bytes->last_logits()), testutil::to_vector(by_path->last_logits()));
  EXPECT_EQ(by_bytes->stats().images_encoded, 1);
  // Files first, then bytes: the second marker takes the bytes; the file's bytes are cached.
  st = by_bytes->feed_chat({{"user",
                             "<start_of_image> or <start_of_image>?",
                             {image_file("photo_96x64.jpg")},
                             {file_bytes(file)}}});
  ASSERT_TRUE(st.ok()) << st.to_string();
  EXPECT_EQ(by_bytes->stats().images, 3);
  EXPECT_EQ(by_bytes->stats().images_encoded, 2);
  st = by_bytes->feed_chat({{"user", "x", {}, {"not an image"}}});
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("image_bytes[0] of message 0"), std::string::npos) << st.to_string();
}

// Requests with images (one, two with markers, files and bytes, a later turn, seeded sampling)
// beside text requests, all at once on 3 sequences with a step of 40 tokens: each equals a lone
// session, and a lone run on a one-sequence engine.
TEST(EngineImages, MixedBatchEqualsLoneSessions) {
  auto m = load_vision();
  ASSERT_TRUE(m);
  const std::string a = image_file("rgb_300x90.png"), b = image_file("photo_96x64.jpg");
  std::vector<EngineRequest> rs(6);
  rs[0].messages = {{"user", "What is this?", {a}}};
  rs[1].text = "Once upon a time";
  rs[2].messages = {{"user", "Compare <start_of_image> with <start_of_image>.", {b}, {file_bytes(a)}}};
  rs[3].messages = {{"user", "hello"}};
  rs[4].messages = {{"user", "Describe it.", {}, {file_bytes(image_file("rgba_64x64.png"))}},
                    {"model", "A square."},
                    {"user", "And now?", {b}}};
  rs[5].messages = rs[0].messages;
  rs[5].options.sampling.temperature = 0.9f;
  rs[5].options.sampling.seed = 7;
  for (size_t i = 0; i < rs.size(); ++i) {
    rs[i].options.max_tokens = 6 + 3 * static_cast<int>(i);
    rs[i].options.top_logprobs = 2;  // the tiny model's ids may not show an image's effect; these do
  }

  EngineOptions eo;
  eo.max_sequences = 3;
  eo.step_tokens = 40;
  auto e = Engine::create(m, eo);
  ASSERT_TRUE(e.ok()) << e.status().to_string();
  const std::vector<Output> got = run_all(**e, rs);
  eo.max_sequences = 1;
  eo.step_tokens = 0;
  auto lone = Engine::create(m, eo);
  ASSERT_TRUE(lone.ok()) << lone.status().to_string();
  for (size_t i = 0; i < rs.size(); ++i) {
    const Output want = reference(*m, rs[i]);
    expect_same(got[i], want, "request " + std::to_string(i));
    expect_same(collect([&](const Engine::OnToken& on) { return (*lone)->generate(rs[i], on); }), want,
                "lone request " + std::to_string(i));
  }
}

// Soft tokens all have one id: a request with another image after the same text must not reuse
// the KV memory past the image (it would see the first image), one with the same image (bytes of
// the same file) reuses it all.
TEST(EngineImages, PrefixReuseTellsImagesApart) {
  auto m = load_vision(128);
  ASSERT_TRUE(m);
  EngineOptions eo;
  eo.max_sequences = 1;
  eo.step_tokens = 128;  // rings of W + 128 - 1 slots: they never wrap here, so any prefix is usable
  auto e = Engine::create(m, eo);
  ASSERT_TRUE(e.ok());
  auto run = [&](const EngineRequest& r) {
    return collect([&](const Engine::OnToken& on) { return (*e)->generate(r, on); });
  };
  const std::string x = image_file("rgb_300x90.png"), y = image_file("photo_96x64.jpg");
  EngineRequest rx, ry;
  rx.messages = {{"user", "What is in the picture?", {x}}};
  ry.messages = {{"user", "What is in the picture?", {y}}};
  rx.options.max_tokens = ry.options.max_tokens = 8;
  rx.options.ignore_eos = ry.options.ignore_eos = true;
  rx.options.top_logprobs = ry.options.top_logprobs = 3;  // a wrong image changes them, if not the ids
  const Output first = run(rx);
  expect_same(first, reference(*m, rx), "image x");

  auto s = m->new_session().value();  // where the image block starts
  ASSERT_TRUE(s->feed_chat(rx.messages).ok());
  const std::vector<int32_t>& ids = s->tokens();
  const size_t soft = std::find(ids.begin(), ids.end(), kImageToken) - ids.begin();
  ASSERT_LT(soft, ids.size());

  uint64_t before = (*e)->stats().reused_tokens;
  expect_same(run(ry), reference(*m, ry), "image y after x");
  EXPECT_EQ((*e)->stats().reused_tokens - before, soft) << "reused past the image";

  // The same image again (as bytes), the next turn: everything the sequence holds is reused.
  const Output again = run(rx);
  EngineRequest next;
  next.messages = {{"user", "What is in the picture?", {}, {file_bytes(x)}},
                   {"model", again.text},
                   {"user", "Are you sure?"}};
  next.options.max_tokens = 5;
  before = (*e)->stats().reused_tokens;
  expect_same(run(next), reference(*m, next), "next turn");
  EXPECT_GT((*e)->stats().reused_tokens - before, soft + 16);
}

TEST(EngineImages, ErrorsAreNamed) {
  auto m = load_vision();
  ASSERT_TRUE(m);
  EngineOptions eo;
  eo.max_sequences = 2;
  auto e = Engine::create(m, eo);
  ASSERT_TRUE(e.ok());
  auto noop = [](const TokenEvent&) { return true; };
  auto done = [](const Result<GenerateResult>&) { ADD_FAILURE() << "on_done of a refused request"; };
  auto refuse = [&](Engine& engine, const EngineRequest& r, ErrorCode code, const std::string& words) {
    auto id = engine.submit(r, noop, done);
    ASSERT_FALSE(id.ok()) << words;
    EXPECT_EQ(id.status().code(), code) << id.status().to_string();
    EXPECT_NE(id.status().message().find(words), std::string::npos) << id.status().message();
    EXPECT_NE(id.status().message().find("EngineRequest::messages"), std::string::npos)
        << id.status().message();
  };
  EngineRequest r;
  r.messages = {{"user", "hi"}, {"model", "yes"}, {"user", "and this?", {}, {"not an image at all"}}};
  refuse(**e, r, ErrorCode::kInvalidFile, "image_bytes[0] of message 2");
  r.messages = {{"user", "hi", {}, {std::string((64 << 20) + 1, 'x')}}};
  refuse(**e, r, ErrorCode::kInvalidFile, "over the limit");
  r.messages = {{"user", "hi", {testutil::data_path("images/no-such.png")}}};
  refuse(**e, r, ErrorCode::kNotFound, "no-such.png");
  r.messages = {{"user", "<start_of_image>", {image_file("rgb_300x90.png"), image_file("rgb_300x90.png")}}};
  refuse(**e, r, ErrorCode::kInvalidArgument, "markers");
  // A step shorter than an image's 16 soft tokens.
  eo.step_tokens = 8;
  auto short_step = Engine::create(m, eo);
  ASSERT_TRUE(short_step.ok());
  r.messages = {{"user", "hi", {image_file("rgb_300x90.png")}}};
  refuse(**short_step, r, ErrorCode::kInvalidArgument, "EngineOptions::step_tokens");
  // The engine still serves requests.
  r.options.max_tokens = 3;
  const Output ok = collect([&](const Engine::OnToken& on) { return (*e)->generate(r, on); });
  expect_same(ok, reference(*m, r), "after the errors");
}

// The real 270M (Q4_K_M): 8 chat and text requests at once equal lone sessions token for
// token (batch_invariant), and with the default kernels every request finishes sensibly.
TEST(EngineReal270m, EightRequestsEqualLoneSessions) {
  const std::string path = testutil::model_270m_path();
  if (!std::ifstream(path).good()) GTEST_SKIP() << "no 270M model at " << path << " (models/fetch.sh)";
  auto m = load(path, 512, /*invariant=*/true);
  ASSERT_TRUE(m);
  std::vector<EngineRequest> rs(8);
  const char* prompts[] = {
      "The capital of France is", "Write a haiku about the sea.",          "def fibonacci(n):",
      "List three colours:",      "Once upon a time, in a small village,", "2 + 2 =",
      "The quick brown fox",      "Explain gravity in one sentence."};
  for (int i = 0; i < 8; ++i) {
    if (i % 2)
      rs[i].messages = {{"user", prompts[i]}};
    else
      rs[i].text = prompts[i];
    rs[i].options.max_tokens = 24;
  }
  EngineOptions eo;
  eo.max_sequences = 8;
  auto e = Engine::create(m, eo);
  ASSERT_TRUE(e.ok()) << e.status().to_string();
  const std::vector<Output> got = run_all(**e, rs);
  for (size_t i = 0; i < rs.size(); ++i) expect_same(got[i], reference(*m, rs[i]), prompts[i]);
}

}  // namespace
}  // namespace gemma3
