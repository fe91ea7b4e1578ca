// Session::generate's finish reasons (issue #16): each reason, the count, what is streamed, and
// what the context holds afterwards (gemma3.h documents it), on the tiny model (512 ids).
#include <gtest/gtest.h>

#include <atomic>
#include <string>
#include <vector>

#include "gemma3/gemma3.h"

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

// Model::is_base_model: a Hugging Face folder does not say (false). The 270M GGUF, which says
// it is a base model: CliModel.RunCompletesABaseModelAsRawText.
TEST(Generate, HfFoldersAreNotBaseModels) {
  auto tiny = load(64);
  ASSERT_TRUE(tiny);
  EXPECT_FALSE(tiny->is_base_model());
}

}  // namespace
}  // namespace gemma3
