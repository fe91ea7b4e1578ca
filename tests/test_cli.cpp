// End-to-end tests of the `gemma3` binary (GEMMA3_CLI_PATH): flags, exit codes, and the
// commands on the real 270M checkpoint (skipped when it is absent).
//
// Goldens come from outside this code base: token ids from the Hugging Face `tokenizers`
// package, memory numbers from docs/architecture.md §5, "Paris" from the question itself.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "gemma3/gemma3.h"
#include "test_util.h"

namespace {

namespace fs = std::filesystem;

struct CliResult {
  int code = -1;  // exit status, or 128 + signal
  std::string out, err;
};

std::string read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_all(const fs::path& p, const std::string& s) {
  std::ofstream out(p, std::ios::binary);
  out << s;
}

std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

fs::path temp_dir() {
  static const fs::path dir = [] {
    std::string tmpl = (fs::path(testing::TempDir()) / "gemma3_cli_XXXXXX").string();
    const char* d = ::mkdtemp(tmpl.data());
    return fs::path(d ? d : testing::TempDir());
  }();
  return dir;
}

// Runs `gemma3 args...` with stdout and stderr captured to files (and stdin from `input`).
// env: "NAME=value " assignments put before the command.
CliResult run_cli(const std::vector<std::string>& args, const std::string& input = "",
                  const std::string& env = "") {
  const fs::path dir = temp_dir();
  const fs::path out = dir / "stdout", err = dir / "stderr", in = dir / "stdin";
  write_all(in, input);
  std::string cmd = env + shell_quote(GEMMA3_CLI_PATH);
  for (const auto& a : args) cmd += " " + shell_quote(a);
  cmd +=
      " <" + shell_quote(in.string()) + " >" + shell_quote(out.string()) + " 2>" + shell_quote(err.string());
  const int status = std::system(cmd.c_str());
  CliResult r;
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.out = read_all(out);
  r.err = read_all(err);
  return r;
}

std::string model_270m() { return gemma3::testutil::model_270m_path(); }

#define REQUIRE_MODEL_270M()                                                                          \
  const std::string model = model_270m();                                                             \
  if (!fs::exists(model))                                                                             \
    GTEST_SKIP() << "270M checkpoint not found at " << model << " (set GEMMA3_MODEL_270M or run the " \
                 << "fetch script in models/)";

// ---- usage ----------------------------------------------------------------------------------

TEST(CliUsage, NoArgumentsListsCommands) {
  const CliResult r = run_cli({});
  EXPECT_EQ(r.code, 0);
  for (const char* c : {"run", "chat", "perplexity", "tokenize", "info"})
    EXPECT_NE(r.out.find(c), std::string::npos) << c;
  EXPECT_EQ(run_cli({"--help"}).out, r.out);
}

// One version: the library's (CMake's project version), which the CLI prints.
TEST(CliUsage, Version) {
  const CliResult r = run_cli({"--version"});
  EXPECT_EQ(r.code, 0);
  EXPECT_EQ(r.out, std::string("gemma3 ") + gemma3::version() + "\n");
  EXPECT_EQ(std::string(gemma3::version()), GEMMA3_PROJECT_VERSION);
}

TEST(CliUsage, EveryCommandHasHelp) {
  for (const char* c : {"run", "chat", "perplexity", "tokenize", "info"}) {
    const CliResult r = run_cli({c, "--help"});
    EXPECT_EQ(r.code, 0) << c;
    EXPECT_NE(r.out.find(std::string("usage: gemma3 ") + c), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("-m, --model PATH"), std::string::npos) << r.out;
    EXPECT_TRUE(r.err.empty()) << r.err;
  }
}

TEST(CliUsage, UnknownCommandExits2) {
  const CliResult r = run_cli({"frobnicate"});
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("unknown command 'frobnicate'"), std::string::npos) << r.err;
}

TEST(CliUsage, UnknownFlagExits2) {
  const CliResult r = run_cli({"run", "-m", "m.gguf", "-p", "hi", "--bogus"});
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("gemma3 run: unknown option '--bogus'"), std::string::npos) << r.err;
  EXPECT_TRUE(r.out.empty()) << r.out;
}

TEST(CliUsage, BadNumberExits2) {
  CliResult r = run_cli({"run", "-m", "m.gguf", "-p", "hi", "--temp", "abc"});
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("gemma3 run: --temp expects a number, got 'abc'"), std::string::npos) << r.err;
  // Underflow is a number (it rounds to 0 or a denormal); overflow is not.
  r = run_cli({"run", "-m", "no-such.gguf", "-p", "hi", "--temp", "1e-320"});
  EXPECT_EQ(r.code, 3) << r.err;
  EXPECT_EQ(r.err.find("--temp"), std::string::npos) << r.err;
  r = run_cli({"run", "-m", "no-such.gguf", "-p", "hi", "--temp", "1e400"});
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("--temp expects a number, got '1e400'"), std::string::npos) << r.err;
  r = run_cli({"perplexity", "-m", "m.gguf", "-f", "x.txt", "--ctx", "12x"});
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("--ctx expects an integer, got '12x'"), std::string::npos) << r.err;
  r = run_cli({"info", "-m", "m.gguf", "--kv-type", "f8"});
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("--kv-type expects one of bf16|f32|q8_0|fp8, got 'f8'"), std::string::npos) << r.err;
}

TEST(CliUsage, MissingValueExits2) {
  const CliResult r = run_cli({"run", "-p", "hi", "-m"});
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("gemma3 run: -m expects a value"), std::string::npos) << r.err;
}

TEST(CliUsage, MissingModelFlagExits2) {
  const CliResult r = run_cli({"run", "-p", "hi"});
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("-m MODEL is required"), std::string::npos) << r.err;
}

TEST(CliUsage, OutOfRangeSamplingValueExits2) {
  const CliResult r = run_cli({"run", "-m", "m.gguf", "-p", "hi", "--top-p", "1.5"});
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("--top-p must be in (0, 1], got 1.5"), std::string::npos) << r.err;
}

// ---- input errors (checked before the model is loaded) -------------------------------------

TEST(CliInput, EmptyPromptIsAClearError) {
  const CliResult r = run_cli({"run", "-m", "m.gguf", "-p", ""});
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("the prompt is empty"), std::string::npos) << r.err;
}

TEST(CliInput, InvalidUtf8PromptExits3) {
  const fs::path file = temp_dir() / "bad_utf8.txt";
  write_all(file, std::string("caf\xC3", 4) + "\xFF tail");  // truncated é, then a byte never valid in UTF-8
  const CliResult r = run_cli({"run", "-m", "m.gguf", "-f", file.string()});
  EXPECT_EQ(r.code, 3);
  EXPECT_NE(r.err.find("not valid UTF-8: byte 0xC3 at offset 3"), std::string::npos) << r.err;
}

TEST(CliInput, MissingPromptFileExits3WithPath) {
  const std::string path = (temp_dir() / "no_such_prompt.txt").string();
  const CliResult r = run_cli({"run", "-m", "m.gguf", "-f", path});
  EXPECT_EQ(r.code, 3);
  EXPECT_NE(r.err.find(path), std::string::npos) << r.err;
}

TEST(CliInput, MissingModelFileExits3WithPath) {
  const std::string path = (temp_dir() / "no_such_dir" / "model.gguf").string();
  for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
           {"info", "-m", path}, {"tokenize", "-m", path, "-p", "hi"}, {"run", "-m", path, "-p", "hi"}}) {
    const CliResult r = run_cli(args);
    EXPECT_EQ(r.code, 3) << args[0] << ": " << r.err;
    EXPECT_NE(r.err.find(path), std::string::npos) << r.err;
    EXPECT_EQ(r.err.rfind("gemma3 " + args[0] + ": ", 0), 0u) << r.err;
  }
}

// Issue #12 item 11: an image over a limit is bad input (exit 3) and the message names the limit:
// a PNG header declaring 65535x65535 (was "corrupt or truncated"), a file over 64 MiB (was exit 2;
// a sparse file here). On the committed tiny multimodal fixture (text GGUF + mmproj).
TEST(CliInput, ImageOverTheLimitsExits3) {
  const std::string tiny = std::string(GEMMA3_SOURCE_DIR) + "/tests/data/tiny-vision/";
  if (!fs::exists(tiny + "mmproj-bf16.gguf")) GTEST_SKIP() << "no tests/data/tiny-vision fixture";
  const fs::path header = temp_dir() / "65535x65535.png";
  std::string ihdr("\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR\0\0\xff\xff\0\0\xff\xff\x08\x02\0\0\0\0\0\0\0", 33);
  write_all(header, ihdr);
  const fs::path big = temp_dir() / "64mib_plus_1.png";
  write_all(big, ihdr);
  fs::resize_file(big, (uint64_t{64} << 20) + 1);
  const std::pair<fs::path, std::string> cases[] = {
      {header, "PNG image is 65535x65535 pixels, over the limit of 16384 pixels per side"},
      {big, "image file is 67108865 bytes, over the limit of 67108864 bytes"},
  };
  for (const auto& [image, message] : cases) {
    const CliResult r = run_cli({"run", "-m", tiny + "text-bf16.gguf", "--mmproj", tiny + "mmproj-bf16.gguf",
                                 "--image", image.string(), "-p", "hi", "-n", "1"});
    EXPECT_EQ(r.code, 3) << r.err;
    EXPECT_NE(r.err.find(message), std::string::npos) << r.err;
    EXPECT_NE(r.err.find(image.string()), std::string::npos) << r.err;
  }
  fs::remove(big);
}

// ---- on the 270M checkpoint -----------------------------------------------------------------

// docs/architecture.md §5.2, 270M: b = 2 (K,V) x 1 kv head x 256 x 2 B = 1024 B per slot; 3 global
// and 15 local layers, W = 512. At T = 32768 the global part is 3 x 32768 x 1024 B = 96 MiB and
// an all-global cache 18 x 32768 x 1024 B = 576 MiB. §5's local ring (7.5 MiB, total 103.5 MiB,
// saving 5.57x) assumes W slots per layer, which is our plan with --chunk 1 (W + 1 - 1 slots);
// with the default chunk of 256 each ring holds W + 255 = 767 slots: 15 x 767 x 1024 B.
TEST(CliModel, InfoReports270MConfigAndMemoryPlan) {
  REQUIRE_MODEL_270M();
  CliResult r = run_cli({"info", "-m", model, "--ctx", "32768", "-o", "json"});
  ASSERT_EQ(r.code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["n_layers"], 18);
  EXPECT_EQ(j["n_global_layers"], 3);
  EXPECT_EQ(j["hidden"], 640);
  EXPECT_EQ(j["intermediate"], 2048);
  EXPECT_EQ(j["n_heads"], 4);
  EXPECT_EQ(j["n_kv_heads"], 1);
  EXPECT_EQ(j["head_dim"], 256);
  EXPECT_EQ(j["sliding_window"], 512);
  EXPECT_EQ(j["layer_pattern"], "LLLLLGLLLLLGLLLLLG");
  EXPECT_EQ(j["size_label"], "270M");
  EXPECT_EQ(j["vocab_rows"], 262144);
  EXPECT_DOUBLE_EQ(j["attn_scale"].get<double>(), 0.0625);
  const auto& m = j["memory"];
  EXPECT_EQ(m["bytes_per_slot"], 1024);
  EXPECT_EQ(m["kv_global_bytes"], 96ull << 20);
  EXPECT_EQ(m["local_slots"], 767);
  EXPECT_EQ(m["kv_local_bytes"], 15ull * 767 * 1024);
  EXPECT_EQ(m["kv_all_global_bytes"], 576ull << 20);
  EXPECT_EQ(m["kv_total_bytes"], (96ull << 20) + 15ull * 767 * 1024);

  r = run_cli({"info", "-m", model, "--ctx", "32768", "--chunk", "1", "-o", "json"});
  ASSERT_EQ(r.code, 0) << r.err;
  const auto m1 = nlohmann::json::parse(r.out)["memory"];
  EXPECT_EQ(m1["kv_local_bytes"], 7864320);    // §5 "local ring 7.5 MiB"
  EXPECT_EQ(m1["kv_total_bytes"], 108527616);  // §5 "hybrid total 103.5 MiB"
  EXPECT_NEAR(m1["kv_saving"].get<double>(), 5.57, 0.005);

  // Default context is the model's max (32768), and the text form shows the same numbers.
  r = run_cli({"info", "-m", model});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("memory plan at context 32768"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("96.00 MiB"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("576.00 MiB"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("18 (3 global, 15 local)"), std::string::npos) << r.out;
}

// Ids from the Hugging Face tokenizer, computed once by hand:
//   tokenizers.Tokenizer.from_file("tokenizer.json")  # the published Gemma 3 tokenizer.json
//       .encode("Hello world", add_special_tokens=False).ids == [9259, 1902]
//   (tokens ['Hello', '▁world'])
TEST(CliModel, TokenizeHelloWorld) {
  REQUIRE_MODEL_270M();
  CliResult r = run_cli({"tokenize", "-m", model, "-p", "Hello world", "--ids"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "9259 1902\n");
  r = run_cli({"tokenize", "-m", model, "-p", "Hello world"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "  9259 -> 'Hello'\n  1902 -> ' world'\n");
}

TEST(CliModel, TokenizeParseSpecial) {
  REQUIRE_MODEL_270M();
  // <end_of_turn> is id 106 (docs/architecture.md §4.2) only when special text is parsed.
  CliResult r = run_cli({"tokenize", "-m", model, "-p", "<end_of_turn>", "--ids", "--parse-special"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "106\n");
  r = run_cli({"tokenize", "-m", model, "-p", "<end_of_turn>", "--ids"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out, "106\n");
}

// The checkpoint is the pretrained (not instruction-tuned) 270M. Greedy continuations, from
// Hugging Face transformers 5.x (Gemma3ForCausalLM on this GGUF, dequantized to fp32):
//   "The capital of France is"             -> " the capital of the country of France."  (no Paris)
//   "The capital of France is the city of" -> " Paris. It is the most visited city in France."
// so the test asks the second prompt.
TEST(CliModel, RunRawGreedyKnowsTheCapitalOfFrance) {
  REQUIRE_MODEL_270M();
  const CliResult r = run_cli(
      {"run", "-m", model, "--raw", "-p", "The capital of France is the city of", "-n", "8", "--temp", "0"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("Paris"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.back(), '\n');
  EXPECT_NE(r.err.find("prompt:"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("generated: 8 tokens"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("tok/s"), std::string::npos) << r.err;
  EXPECT_EQ(r.out.find("tok/s"), std::string::npos) << "statistics belong on stderr";
}

// Issue #16: the default model is the base 270M, whose GGUF has no chat template and no
// fine-tune name. `run` completes it as raw text by default (the quickstart's first output) and
// says so; --chat-template or --system keep the template.
TEST(CliModel, RunCompletesABaseModelAsRawText) {
  REQUIRE_MODEL_270M();
  const std::vector<std::string> common = {"-p", "The capital of France is the city of", "-n", "8", "--temp",
                                           "0"};
  auto run = [&](std::vector<std::string> extra) {
    std::vector<std::string> args = {"run", "-m", model};
    args.insert(args.end(), extra.begin(), extra.end());
    args.insert(args.end(), common.begin(), common.end());
    return run_cli(args);
  };
  const CliResult raw = run({"--raw"}), dflt = run({}), templ = run({"--chat-template"}),
                  sys = run({"--system", "Be brief."});
  for (const CliResult* r : {&raw, &dflt, &templ, &sys}) ASSERT_EQ(r->code, 0) << r->err;
  gemma3::LoadOptions o;
  o.backend = gemma3::BackendKind::kCpu;
  o.context = 64;
  auto loaded = gemma3::Model::load(model, o);
  ASSERT_TRUE(loaded.ok()) << loaded.status().to_string();
  EXPECT_TRUE((*loaded)->is_base_model());
  EXPECT_EQ(dflt.out, raw.out);
  EXPECT_NE(dflt.out.find("Paris"), std::string::npos) << dflt.out;
  EXPECT_NE(dflt.err.find("is a base (pre-trained) model: completing the prompt as raw text"),
            std::string::npos)
      << dflt.err;
  for (const CliResult* r : {&raw, &templ, &sys})
    EXPECT_EQ(r->err.find("base (pre-trained)"), std::string::npos);
  EXPECT_NE(templ.out, raw.out) << "--chat-template should wrap the prompt";
  EXPECT_EQ(run({"--raw", "--chat-template"}).code, 2);
}

TEST(CliModel, RunPromptLongerThanContextExits4) {
  REQUIRE_MODEL_270M();
  std::string prompt;
  for (int i = 0; i < 50; ++i) prompt += "one two three four ";
  const CliResult r = run_cli({"run", "-m", model, "--raw", "--ctx", "32", "-p", prompt, "-n", "4"});
  EXPECT_EQ(r.code, 4) << r.err;
  EXPECT_NE(r.err.find("out of range"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("--ctx"), std::string::npos) << r.err;
}

// The pretrained 270M cannot hold a conversation: under the chat template it echoes the user's
// text. It does copy from its context, though, which is what this test uses: asked "What is my
// name?" in a session that holds the first turn, it answers with that turn's "My name is Ada";
// after /clear it cannot. Goldens (24 greedy tokens each) from Hugging Face transformers on this
// GGUF with the ids of the whole conversation (first turn, its 24-token reply, then
// "<end_of_turn>\n<start_of_turn>user\nWhat is my name?<end_of_turn>\n<start_of_turn>model\n",
// which equals apply_chat_template of the three messages). The second reply has a near-tie
// ("?" vs "\n") that the fast CPU path's int8 decode activations can flip, so this runs the
// exact fp32 kernels (GEMMA3_CPU_KERNELS=portable): token-for-token parity is what it checks.
constexpr const char* kReply1 =
    "My name is Ada. Reply OK. mendatanguser\nMy name is Ada. Reply OK. mendatanguser\nMy name";
constexpr const char* kReply2 =
    "My name is Ada. Reply OK. mendatanguser\nMy name\u3068\u306F? mendatanguser\nMy name\u3068\u306F? "
    "mendatanguser";
constexpr const char* kReplyFresh =
    "What is your name? mendatanguser\nWhat is your name? mendatanguser\nWhat is your name? mendatanguser\n";

TEST(CliModel, ChatFromPipeKeepsEarlierTurns) {
  REQUIRE_MODEL_270M();
  const std::string input =
      "My name is Ada. Reply OK.\n"
      "What is my name?\n"
      "/clear\n"
      "What is my name?\n"
      "/exit\n"
      "this line is never read\n";
#ifdef __SANITIZE_ADDRESS__
  // The scalar exact kernels take ~300 s under ASan + UBSan: the sanitized build runs the chat
  // loop on the default kernels for memory safety and checks only what does not hinge on a
  // near-tie; the release builds check the exact text.
  const CliResult s = run_cli({"chat", "-m", model, "--temp", "0", "-n", "24"}, input);
  ASSERT_EQ(s.code, 0) << s.err;
  EXPECT_EQ(s.out.find("> "), std::string::npos) << "no prompt on a pipe";
  EXPECT_EQ(s.out.rfind("My name is Ada", 0), 0u) << s.out;
  EXPECT_EQ(s.out.find("never read"), std::string::npos);
  std::printf("  sanitizer build: exact reply text not compared (see the comment)\n");
  return;
#endif
  const CliResult r =
      run_cli({"chat", "-m", model, "--temp", "0", "-n", "24"}, input, "GEMMA3_CPU_KERNELS=portable ");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out.find("> "), std::string::npos) << "no prompt on a pipe";
  // Each reply is followed by one newline; the first is known, so the rest can be split off.
  const std::string reply1 = std::string(kReply1) + "\n";
  ASSERT_EQ(r.out.rfind(reply1, 0), 0u) << r.out;
  const std::string rest = r.out.substr(reply1.size());
  const size_t cut = rest.find("\nWhat is your name?");
  ASSERT_NE(cut, std::string::npos) << rest;
  const std::string reply2 = rest.substr(0, cut);
  const std::string reply_fresh = rest.substr(cut + 1);
  EXPECT_NE(reply2.find("Ada"), std::string::npos) << "second turn must see the first: " << reply2;
  EXPECT_EQ(reply_fresh.find("Ada"), std::string::npos) << "after /clear: " << reply_fresh;
  EXPECT_EQ(reply2, kReply2);
  EXPECT_EQ(reply_fresh, std::string(kReplyFresh) + "\n");
  EXPECT_EQ(r.out.find("never read"), std::string::npos);
}

TEST(CliModel, PerplexityOfAShortText) {
  REQUIRE_MODEL_270M();
  std::string text;
  for (int i = 0; i < 6; ++i) {
    text +=
        "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is the "
        "capital of Germany. Water boils at one hundred degrees Celsius at sea level.\n";
  }
  const fs::path file = temp_dir() / "ppl.txt";
  write_all(file, text);
  // Golden from Hugging Face transformers on this GGUF (fp32, dequantized), with the same
  // protocol ([bos] + text = 223 tokens, 3 windows of 64 with bos first, positions 32..62
  // scored): ppl 2.13400, +/- 0.34155. We keep a bf16 KV cache and round the embedding scale to
  // bf16 as the reference model does, so allow 2% (measured: 2.1400).
  CliResult r = run_cli({"perplexity", "-m", model, "-f", file.string(), "--ctx", "64", "-o", "json"});
  ASSERT_EQ(r.code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["tokens_total"], 223);
  EXPECT_EQ(j["chunks"], 3);
  EXPECT_EQ(j["tokens_scored"], 3 * 31);  // 64 - 32 - 1 per window
  const double ppl = j["ppl"];
  EXPECT_NEAR(ppl, 2.13400, 0.02 * 2.13400);
  EXPECT_NEAR(j["ppl_error"].get<double>(), 0.34155, 0.05 * 0.34155);
  EXPECT_NEAR(std::log(ppl), j["nll"].get<double>(), 1e-9);

  r = run_cli({"perplexity", "-m", model, "-f", file.string(), "--ctx", "64", "--chunks", "1"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out.rfind("ppl = ", 0), 0u) << r.out;
  EXPECT_NE(r.err.find("[1/1]"), std::string::npos) << r.err;

  // Too short for two windows: a clear error, exit 3.
  r = run_cli({"perplexity", "-m", model, "-f", file.string(), "--ctx", "4096"});
  EXPECT_EQ(r.code, 3);
  EXPECT_NE(r.err.find("at least 2 x --ctx = 8192"), std::string::npos) << r.err;
}

// Ctrl-C during generation stops it cleanly: the process reports the statistics and exits 130.
TEST(CliModel, SigintStopsGeneration) {
  REQUIRE_MODEL_270M();
  const fs::path out = temp_dir() / "sigint_out", err = temp_dir() / "sigint_err";
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    const int fo = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int fe = ::open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::dup2(fo, STDOUT_FILENO);
    ::dup2(fe, STDERR_FILENO);
    ::execl(GEMMA3_CLI_PATH, "gemma3", "run", "-m", model.c_str(), "--raw", "-p", "Once upon a time", "-n",
            "-1", "--ctx", "4096", "--temp", "0", static_cast<char*>(nullptr));
    ::_exit(127);
  }
  // Wait until tokens are streaming, then interrupt once.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (std::chrono::steady_clock::now() < deadline && (!fs::exists(out) || fs::file_size(out) < 8))
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  ::kill(pid, SIGINT);
  int status = 0;
  ::waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status)) << "killed by a signal instead of exiting";
  EXPECT_EQ(WEXITSTATUS(status), 130);
  const std::string e = read_all(err);
  EXPECT_NE(e.find("interrupted"), std::string::npos) << e;
  EXPECT_NE(e.find("generated:"), std::string::npos) << e;
}

// ---- bench ----------------------------------------------------------------------------------

// tg rows put the weight bandwidth against a copy measured in the same run on the same backend:
// pct_of_copy = avg_ts * bytes_per_token / copy bandwidth, every field present and positive.
TEST(CliBench, TgReportsShareOfTheCopyBandwidth) {
  const std::string tiny = std::string(GEMMA3_SOURCE_DIR) + "/tests/data/tiny-f32.gguf";
  const CliResult r =
      run_cli({"bench", "-m", tiny, "-p", "8", "-n", "4", "-r", "2", "-t", "2", "-o", "json"});
  ASSERT_EQ(r.code, 0) << r.err;
  const nlohmann::json j = nlohmann::json::parse(r.out);
  int tg_rows = 0;
  for (const auto& row : j) {
    if (row.value("test", "") != "tg4") continue;
    ++tg_rows;
    const double copy = row.at("copy_gb_per_s").get<double>(), gbs = row.at("gb_per_s").get<double>();
    EXPECT_GT(copy, 0.1) << row.dump();
    EXPECT_NEAR(gbs, row.at("avg_ts").get<double>() * row.at("bytes_per_token").get<double>() / 1e9,
                1e-6 * gbs);
    EXPECT_NEAR(row.at("pct_of_copy").get<double>(), 100.0 * gbs / copy,
                1e-6 * row.at("pct_of_copy").get<double>());
  }
  EXPECT_EQ(tg_rows, 1) << r.out;
  const CliResult md = run_cli({"bench", "-m", tiny, "-p", "0", "-n", "4", "-r", "1", "-t", "2"});
  ASSERT_EQ(md.code, 0) << md.err;
  EXPECT_NE(md.out.find("| % of copy |"), std::string::npos) << md.out;
  EXPECT_NE(md.out.find("memory roofline (memcpy, 2 threads, same run)"), std::string::npos) << md.out;
}

// pp rows report the model FLOPs per second. tiny-f32 (H 96, I 160, 4 heads x 32 = 128 query
// and 2 x 32 = 64 kv width, 8 layers, window 8, vocab 512), pp8 from an empty context:
// projections and MLP 2 (96 (128 + 2 * 64) + 128 * 96 + 3 * 96 * 160) = 165888 per token and
// layer, x 8 tokens x 8 layers = 10616832; attention 4 * 128 * (1 + ... + 8 keys) = 18432 per
// layer (every key inside the window), x 8 = 147456; the LM head for the last token 2 * 96 *
// 512 = 98304: 10862592 FLOPs per run. The CPU has no GEMM reference, so no pct_of_gemm.
TEST(CliBench, PpReportsModelFlopsPerSecond) {
  const std::string tiny = std::string(GEMMA3_SOURCE_DIR) + "/tests/data/tiny-f32.gguf";
  const CliResult r =
      run_cli({"bench", "-m", tiny, "-p", "8", "-n", "0", "-r", "2", "-t", "2", "-o", "json"});
  ASSERT_EQ(r.code, 0) << r.err;
  const nlohmann::json j = nlohmann::json::parse(r.out);
  ASSERT_EQ(j.size(), 1u) << r.out;
  const double tps = j[0].at("avg_ts").get<double>(), tflops = j[0].at("tflop_per_s").get<double>();
  EXPECT_NEAR(tflops * 1e12, 10862592.0 * tps / 8, 1e-6 * tflops * 1e12) << r.out;
  EXPECT_FALSE(j[0].contains("pct_of_gemm")) << r.out;
  const CliResult md = run_cli({"bench", "-m", tiny, "-p", "8", "-n", "0", "-r", "1", "-t", "2"});
  ASSERT_EQ(md.code, 0) << md.err;
  EXPECT_NE(md.out.find("| TFLOP/s | % of GEMM |"), std::string::npos) << md.out;
}

// --parallel: aggregate rates per N (an Engine of N sequences), one json entry per N with the
// repetitions' samples, and the per-N line scripts parse; flags it does not take are usage errors.
TEST(CliBench, ParallelReportsAggregateRatesPerSequenceCount) {
  const std::string tiny = std::string(GEMMA3_SOURCE_DIR) + "/tests/data/tiny-f32.gguf";
  const CliResult r = run_cli(
      {"bench", "-m", tiny, "--parallel", "1,3", "-p", "4", "-n", "4", "-r", "2", "-t", "2", "-o", "json"});
  ASSERT_EQ(r.code, 0) << r.err;
  const nlohmann::json j = nlohmann::json::parse(r.out);
  ASSERT_EQ(j.size(), 2u) << r.out;
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(j[i].at("test"), "parallel");
    EXPECT_EQ(j[i].at("n_parallel").get<int>(), i == 0 ? 1 : 3);
    EXPECT_EQ(j[i].at("n_prompt").get<int>(), 4);
    EXPECT_EQ(j[i].at("pp_samples_ts").size(), 2u);
    EXPECT_EQ(j[i].at("tg_samples_ts").size(), 2u);
    EXPECT_GT(j[i].at("pp_avg_ts").get<double>(), 0.0);
    EXPECT_GT(j[i].at("tg_avg_ts").get<double>(), 0.0);
  }
  const CliResult md =
      run_cli({"bench", "-m", tiny, "--parallel", "2", "-p", "4", "-n", "4", "-r", "1", "-t", "2"});
  ASSERT_EQ(md.code, 0) << md.err;
  EXPECT_NE(md.out.find("| tg t/s (each) |"), std::string::npos) << md.out;
  EXPECT_NE(md.out.find("parallel 2: pp "), std::string::npos) << md.out;
  for (const std::vector<std::string>& bad : {std::vector<std::string>{"--parallel", "0"},
                                              {"--parallel", "2,x"},
                                              {"--parallel", "2", "-d", "8"},
                                              {"--parallel", "2", "-p", "0"}}) {
    std::vector<std::string> args = {"bench", "-m", tiny};
    args.insert(args.end(), bad.begin(), bad.end());
    const CliResult e = run_cli(args);
    EXPECT_EQ(e.code, 2) << bad[1] << ": " << e.err;
  }
}

// info --parallel N plans N sequences: N times one sequence's KV (same context and chunk).
TEST(CliInfo, ParallelPlansNSequences) {
  const std::string tiny = std::string(GEMMA3_SOURCE_DIR) + "/tests/data/tiny-f32.gguf";
  const CliResult one = run_cli({"info", "-m", tiny, "--ctx", "64", "-o", "json"});
  const CliResult three = run_cli({"info", "-m", tiny, "--ctx", "64", "--parallel", "3", "-o", "json"});
  ASSERT_EQ(one.code, 0) << one.err;
  ASSERT_EQ(three.code, 0) << three.err;
  const nlohmann::json a = nlohmann::json::parse(one.out).at("memory"),
                       b = nlohmann::json::parse(three.out).at("memory");
  EXPECT_EQ(a.at("sequences").get<int>(), 1);
  EXPECT_EQ(b.at("sequences").get<int>(), 3);
  EXPECT_EQ(b.at("kv_global_bytes").get<uint64_t>(), 3 * a.at("kv_global_bytes").get<uint64_t>());
  EXPECT_EQ(b.at("kv_local_bytes").get<uint64_t>(), 3 * a.at("kv_local_bytes").get<uint64_t>());
  const CliResult text = run_cli({"info", "-m", tiny, "--ctx", "64", "--parallel", "3"});
  EXPECT_NE(text.out.find("3 sequences x "), std::string::npos) << text.out;
  EXPECT_EQ(run_cli({"info", "-m", tiny, "--parallel", "0"}).code, 2);
}

}  // namespace
