// Hostile and careless input, issue #12: prompt caches that are not files, stale prompt caches,
// thread counts, tiny temperatures, chat truncation over partial UTF-8, unbounded input,
// exceptions at the API boundary. Each test names the item it guards.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "backend/cpu/cpu_pool.h"
#include "checkpoint/gguf.h"
#include "core/thread_pool.h"
#include "gemma3/gemma3.h"
#include "gemma3/util.h"
#include "test_util.h"
#include "text/chat_template.h"

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define GEMMA3_TEST_SANITIZED 1
#endif

namespace gemma3 {
namespace {

namespace fs = std::filesystem;
const std::string kData = std::string(GEMMA3_SOURCE_DIR) + "/tests/data";

fs::path temp_dir() {
  static const fs::path dir = [] {
    std::string tmpl = (fs::path(testing::TempDir()) / "gemma3_hardening_XXXXXX").string();
    const char* d = ::mkdtemp(tmpl.data());
    return fs::path(d ? d : testing::TempDir());
  }();
  return dir;
}

std::shared_ptr<Model> load(const std::string& path, int context = 64) {
  LoadOptions o;
  o.backend = BackendKind::kCpu;
  o.threads = 1;
  o.context = context;
  o.prefill_chunk = 8;
  auto m = Model::load(path, o);
  EXPECT_TRUE(m.ok()) << m.status().to_string();
  return m.ok() ? *m : nullptr;
}

struct Cli {
  int code = -1;
  std::string out, err;
};

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Runs `gemma3 <args>` through the shell (args are already quoted where needed); stdin from
// `stdin_path`.
Cli cli(const std::string& args, const std::string& stdin_path = "/dev/null") {
  const fs::path out = temp_dir() / "out", err = temp_dir() / "err";
  const std::string cmd = std::string("'") + GEMMA3_CLI_PATH + "' " + args + " <" + stdin_path + " >'" +
                          out.string() + "' 2>'" + err.string() + "'";
  const int status = std::system(cmd.c_str());
  Cli r;
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.out = slurp(out);
  r.err = slurp(err);
  return r;
}

bool contains(const std::string& s, const std::string& what) { return s.find(what) != std::string::npos; }

// ---- #12.2: a prompt cache that is not a regular file ---------------------------------------

TEST(HardeningPromptCache, DirectoriesDevicesAndProcFilesAreErrorsNotExceptions) {
  auto model = load(kData + "/tiny");
  ASSERT_TRUE(model);
  auto s = model->new_session().value();
  ASSERT_TRUE(s->feed_tokens({2, 10, 11, 12}).ok());
  const fs::path dir = temp_dir() / "a_directory";
  fs::create_directories(dir);
  for (const std::string path : {dir.string(), std::string("/proc/self/mem"), std::string("/dev/zero"),
                                 std::string("/proc/self/status")}) {
    const Status st = s->load_state(path);
    EXPECT_FALSE(st.ok()) << path;
    EXPECT_EQ(st.code(), ErrorCode::kInvalidFile) << path << ": " << st.to_string();
    EXPECT_TRUE(contains(st.message(), path)) << st.message();
    EXPECT_EQ(s->position(), 4) << "a failed restore leaves the session as it was";
  }
  const Status saved = s->save_state(dir.string());
  EXPECT_EQ(saved.code(), ErrorCode::kInvalidFile) << saved.to_string();
  EXPECT_TRUE(contains(saved.message(), "directory")) << saved.message();
  EXPECT_TRUE(fs::is_directory(dir));
}

TEST(HardeningPromptCache, CliRefusesADirectoryWithExit3) {
  const fs::path dir = temp_dir() / "cache_dir";
  fs::create_directories(dir);
  for (const std::string path : {dir.string(), std::string("/proc/self/mem")}) {
    const Cli r =
        cli("run -m '" + kData + "/tiny' --raw --ctx 64 -n 2 -p 'hello' --prompt-cache '" + path + "'");
    EXPECT_EQ(r.code, 3) << path << "\n" << r.err;
    EXPECT_TRUE(contains(r.err, "prompt cache")) << r.err;
    EXPECT_TRUE(contains(r.err, path)) << r.err;
  }
}

// ---- #12.8: the fingerprint covers every byte ------------------------------------------------

TEST(HardeningPromptCache, ACheckpointThatDiffersLateInATensorDoesNotMatch) {
  const std::string original = kData + "/tiny-f32.gguf";
  // The largest tensor's last 64 bytes, found in the file and changed there.
  std::string bytes = slurp(original);
  std::string tail;
  uint64_t largest = 0;
  {
    auto gguf = GgufFile::open(original);
    ASSERT_TRUE(gguf.ok()) << gguf.status().to_string();
    const TensorView* big = nullptr;
    for (const TensorView& t : gguf->tensors())
      if (!big || t.nbytes > big->nbytes) big = &t;
    ASSERT_NE(big, nullptr);
    largest = big->nbytes;
    tail.assign(static_cast<const char*>(big->data) + big->nbytes - 64, 64);
  }
  ASSERT_GT(largest, 4096u * 4) << "the test needs a tensor well past the old 4 KiB prefix";
  const size_t at = bytes.find(tail);
  ASSERT_NE(at, std::string::npos);
  ASSERT_EQ(bytes.find(tail, at + 1), std::string::npos) << "the tail must be unique in the file";
  bytes[at + 60] ^= 0x01;  // one bit of the last float's low mantissa byte
  const fs::path changed = temp_dir() / "tiny-f32-changed.gguf";
  std::ofstream(changed, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));

  const fs::path state = temp_dir() / "fingerprint.state";
  auto a = load(original);
  ASSERT_TRUE(a);
  auto sa = a->new_session().value();
  ASSERT_TRUE(sa->feed_tokens({2, 10, 11}).ok());
  ASSERT_TRUE(sa->save_state(state.string()).ok());
  // The same file again matches; the changed one does not.
  auto same = load(original)->new_session().value();
  EXPECT_TRUE(same->load_state(state.string()).ok());
  auto b = load(changed.string());
  ASSERT_TRUE(b);
  auto sb = b->new_session().value();
  const Status st = sb->load_state(state.string());
  EXPECT_FALSE(st.ok());
  EXPECT_TRUE(contains(st.message(), "another model")) << st.to_string();
}

// ---- #12.3: thread counts --------------------------------------------------------------------

TEST(HardeningThreads, CountsOutOfRangeAreErrorsNamingTheLimit) {
  for (int threads : {-1, kMaxThreads + 1, 100000}) {
    LoadOptions o;
    o.backend = BackendKind::kCpu;
    o.threads = threads;
    auto m = Model::load(kData + "/tiny", o);
    ASSERT_FALSE(m.ok()) << threads;
    EXPECT_EQ(m.status().code(), ErrorCode::kInvalidArgument);
    EXPECT_TRUE(contains(m.status().message(), "threads")) << m.status().message();
    EXPECT_TRUE(contains(m.status().message(), std::to_string(kMaxThreads))) << m.status().message();
  }
  const Cli r = cli("run -m '" + kData + "/tiny' -t 100000 -p hi");
  EXPECT_EQ(r.code, 2) << r.err;
  EXPECT_TRUE(contains(r.err, "--threads")) << r.err;
}

// LoadOptions::prefill_chunk: 0 (the default) is the backend's choice, kCpuPrefillChunk on the
// CPU (the plan equals an explicit 256 and differs from 512); outside [0, 65536] it is an error
// naming the field.
TEST(HardeningOptions, PrefillChunkDefaultsPerBackendAndIsRangeChecked) {
  auto plan = [](int chunk) {
    LoadOptions o;
    o.backend = BackendKind::kCpu;
    o.context = 1024;
    o.prefill_chunk = chunk;
    auto m = Model::load(kData + "/tiny", o);
    EXPECT_TRUE(m.ok()) << m.status().to_string();
    return m.ok() ? (*m)->memory_plan() : MemoryReport{};
  };
  const MemoryReport dflt = plan(0), cpu = plan(kCpuPrefillChunk), other = plan(kCudaPrefillChunk);
  EXPECT_EQ(dflt.kv_local_bytes, cpu.kv_local_bytes);
  EXPECT_EQ(dflt.scratch_bytes, cpu.scratch_bytes);
  EXPECT_LT(dflt.kv_local_bytes, other.kv_local_bytes);
  for (int chunk : {-1, 65537}) {
    LoadOptions o;
    o.backend = BackendKind::kCpu;
    o.prefill_chunk = chunk;
    auto m = Model::load(kData + "/tiny", o);
    ASSERT_FALSE(m.ok()) << chunk;
    EXPECT_EQ(m.status().code(), ErrorCode::kInvalidArgument);
    EXPECT_TRUE(contains(m.status().message(), "LoadOptions::prefill_chunk")) << m.status().message();
  }
}

// A thread the system refuses (here: no address space left for its stack) is an error value,
// never std::terminate. Runs in a child process, whose address space is capped.
TEST(HardeningThreads, ThreadCreationFailureIsAnError) {
#ifdef GEMMA3_TEST_SANITIZED
  GTEST_SKIP() << "sanitizer runtimes reserve address space; capping RLIMIT_AS breaks them";
#else
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    // Address space now + 256 MiB: 64 threads of 8 MiB stacks cannot all start.
    std::ifstream statm("/proc/self/statm");
    uint64_t pages = 0;
    statm >> pages;
    const rlim_t cap = pages * static_cast<uint64_t>(::sysconf(_SC_PAGESIZE)) + (256u << 20);
    rlimit rl{cap, cap};
    if (::setrlimit(RLIMIT_AS, &rl) != 0) ::_exit(10);
    int code = 0;
    {
      cpu::CpuPool pool(64);
      if (pool.start_error().empty()) code |= 1;
      if (pool.size() != 1) code |= 2;
      pool.run(4, [](int64_t, int) {});  // still usable, on the calling thread
    }
    {
      ThreadPool pool(64);
      if (pool.start_error().empty()) code |= 4;
      int64_t sum = 0;
      pool.parallel_for(10, [&](int64_t b, int64_t e, int) { sum += e - b; });
      if (sum != 10) code |= 8;
    }
    ::_exit(code);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status)) << "the child died of signal " << WTERMSIG(status);
  EXPECT_EQ(WEXITSTATUS(status), 0)
      << "bits: 1 CpuPool started all, 2 CpuPool size, 4 ThreadPool started all, "
         "8 ThreadPool lost work, 10 setrlimit failed";
#endif
}

// ---- #12.4: sampling options -----------------------------------------------------------------

TEST(HardeningSampling, TinyTemperatureIsGreedyAndBadOptionsNameTheirField) {
  auto model = load(kData + "/tiny");
  ASSERT_TRUE(model);
  auto generate = [&](float temperature, Status* st) {
    auto s = model->new_session().value();
    EXPECT_TRUE(s->feed_text("The capital of France is").ok());
    GenerateOptions g;
    g.max_tokens = 12;
    g.sampling.temperature = temperature;
    g.sampling.seed = 1234;
    std::vector<int32_t> ids;
    *st = s->generate(g, [&](const TokenEvent& e) {
             if (e.id >= 0) ids.push_back(e.id);
             return true;
           }).status();
    return ids;
  };
  Status st;
  const auto greedy = generate(0.0f, &st);
  ASSERT_TRUE(st.ok()) << st.to_string();
  ASSERT_FALSE(greedy.empty());
  EXPECT_EQ(generate(1e-38f, &st), greedy);
  EXPECT_TRUE(st.ok()) << st.to_string();

  auto s = model->new_session().value();
  ASSERT_TRUE(s->feed_text("x").ok());
  struct Bad {
    const char* field;
    SamplingOptions o;
  };
  std::vector<Bad> bad(6);
  bad[0] = {"temperature", {}};
  bad[0].o.temperature = std::numeric_limits<float>::quiet_NaN();
  bad[1] = {"temperature", {}};
  bad[1].o.temperature = -1.0f;
  bad[2] = {"top_p", {}};
  bad[2].o.top_p = 0.0f;
  bad[3] = {"top_k", {}};
  bad[3].o.top_k = -2;
  bad[4] = {"min_p", {}};
  bad[4].o.min_p = 1.5f;
  bad[5] = {"repeat_penalty", {}};
  bad[5].o.repeat_penalty = std::numeric_limits<float>::infinity();
  for (const Bad& b : bad) {
    GenerateOptions g;
    g.sampling = b.o;
    const Status e = s->generate(g, [](const TokenEvent&) { return true; }).status();
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << b.field;
    EXPECT_TRUE(contains(e.message(), b.field)) << e.message();
  }
}

// ---- the API never throws --------------------------------------------------------------------

TEST(HardeningApi, AnExceptionFromTheCallbackBecomesAnError) {
  auto model = load(kData + "/tiny");
  ASSERT_TRUE(model);
  auto s = model->new_session().value();
  ASSERT_TRUE(s->feed_text("hello").ok());
  Status st;
  EXPECT_NO_THROW(
      st = s->generate({}, [](const TokenEvent&) -> bool { throw std::runtime_error("boom"); }).status());
  EXPECT_EQ(st.code(), ErrorCode::kInternal);
  EXPECT_TRUE(contains(st.message(), "boom")) << st.message();
}

// ---- #12.7: chat truncation over replies that end inside a UTF-8 character -------------------

TEST(HardeningChat, ModelRepliesWithPartialUtf8RenderAsBytePieces) {
  auto model = load(kData + "/tiny");
  ASSERT_TRUE(model);
  const Tokenizer& tok = model->tokenizer();
  const std::string emoji = "\xF0\x9F\x98\x80";  // U+1F600
  for (const std::string reply :
       {std::string("\xF0"), std::string("\xF0\x9F"), emoji.substr(0, 3), "ok " + emoji.substr(0, 2),
        std::string("\x80 stray"), std::string("\xFF")}) {
    auto ids = render_chat(tok, {{"user", emoji}, {"model", reply}, {"user", emoji}}, true, true);
    ASSERT_TRUE(ids.ok()) << ids.status().to_string();
    // The reply's bytes come back exactly from its ids.
    std::string decoded = tok.decode(*ids);
    EXPECT_TRUE(contains(decoded, reply)) << "reply bytes lost";
  }
  // User content must still be valid UTF-8.
  auto bad = render_chat(tok, {{"user", "\xF0"}}, true, true);
  EXPECT_FALSE(bad.ok());
}

TEST(HardeningChat, TruncationWorksOverPartialUtf8Replies) {
  auto model = load(kData + "/tiny", 64);
  ASSERT_TRUE(model);
  auto s = model->new_session().value();
  std::vector<ChatMessage> history;
  const std::string emoji = "\xF0\x9F\x98\x80";
  for (int turn = 0; turn < 12; ++turn) {
    history.push_back({"user", emoji + emoji});
    history.push_back({"model", turn % 2 ? std::string("\xF0\x9F") : std::string("\x98")});
  }
  history.push_back({"user", emoji});
  auto dropped = s->feed_chat_truncating(history, 4);
  ASSERT_TRUE(dropped.ok()) << dropped.status().to_string();
  EXPECT_GT(*dropped, 0);
  EXPECT_LE(s->position() + 4, 64);
}

// The reproduction through the CLI: 12 lines of emoji, one-token replies, a 64-token
// context, truncation on.
TEST(HardeningChat, CliTruncatesEmojiConversations) {
  std::string input;
  const char* faces[] = {"\xF0\x9F\x98\x80", "\xF0\x9F\x90\xB1", "\xF0\x9F\x8D\x95",
                         "\xE2\x9D\xA4\xEF\xB8\x8F"};
  for (int i = 0; i < 12; ++i)
    input += std::string(faces[i % 4]) + faces[(i + 1) % 4] + faces[(i + 2) % 4] + "\n";
  const fs::path in = temp_dir() / "emoji.txt";
  std::ofstream(in, std::ios::binary) << input;
  const Cli r = cli(
      "chat -m '" + kData + "/tiny' -n 1 --ctx 64 --chunk 8 --temp 0.9 --seed 3 --context-overflow truncate",
      "'" + in.string() + "'");
  EXPECT_EQ(r.code, 0) << r.err;
}

// ---- #12.9, #12.11: bounded input ------------------------------------------------------------

TEST(HardeningInput, RunRefusesInputThatCannotFitBeforeTokenizing) {
  // /dev/zero never ends: refused once it passes the pre-load bound, with exit 4.
  Cli r = cli("run -m '" + kData + "/tiny' --ctx 64 -f /dev/zero");
  EXPECT_EQ(r.code, 4) << r.err;
  EXPECT_TRUE(contains(r.err, "/dev/zero")) << r.err;
  // 4 MB of text with --ctx 512 cannot fit (512 x the longest token's bytes): exit 4, named.
  const fs::path big = temp_dir() / "big.txt";
  {
    std::ofstream out(big, std::ios::binary);
    const std::string line = "the quick brown fox jumps over the lazy dog\n";
    for (size_t n = 0; n < (4u << 20); n += line.size()) out << line;
  }
  r = cli("run -m '" + kData + "/tiny' --ctx 512 -f '" + big.string() + "'");
  EXPECT_EQ(r.code, 4) << r.err;
  EXPECT_TRUE(contains(r.err, "512 tokens")) << r.err;
  // Larger than any context at all (12 MiB): refused before the model loads.
  const fs::path huge = temp_dir() / "huge.txt";
  {
    std::ofstream out(huge, std::ios::binary);
    out.seekp(static_cast<std::streamoff>(13u << 20));
    out << "x";
  }
  r = cli("run -m /nonexistent -f '" + huge.string() + "'");
  EXPECT_EQ(r.code, 4) << r.err;
}

TEST(HardeningInput, ChatLinesAreReadWithALimit) {
  const Cli r = cli("chat -m '" + kData + "/tiny' --ctx 64", "/dev/zero");
  EXPECT_EQ(r.code, 4) << r.err;
  EXPECT_TRUE(contains(r.err, "longer than")) << r.err;
}

TEST(HardeningInput, ReadFileLimitedKindsAndLimits) {
  const fs::path f = temp_dir() / "ten.txt";
  std::ofstream(f, std::ios::binary) << "0123456789";
  auto ok = read_file_limited(f.string(), 10, "text", FileKind::kRegular);
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(*ok, "0123456789");
  auto over = read_file_limited(f.string(), 9, "text", FileKind::kRegular, ErrorCode::kInvalidFile);
  EXPECT_EQ(over.status().code(), ErrorCode::kInvalidFile);
  auto dev = read_file_limited("/dev/zero", 1000, "text", FileKind::kStream);
  EXPECT_EQ(dev.status().code(), ErrorCode::kOutOfRange);
  auto not_regular = read_file_limited("/dev/zero", 1000, "text", FileKind::kRegular);
  EXPECT_EQ(not_regular.status().code(), ErrorCode::kInvalidFile);
  auto missing = read_file_limited((temp_dir() / "nope").string(), 10, "text", FileKind::kStream);
  EXPECT_EQ(missing.status().code(), ErrorCode::kNotFound);
  std::istringstream lines("short\n0123456789abc\nlast");
  std::string line;
  bool too_long = false;
  ASSERT_TRUE(read_line_limited(lines, line, 10, &too_long));
  EXPECT_EQ(line, "short");
  EXPECT_FALSE(too_long);
  ASSERT_TRUE(read_line_limited(lines, line, 10, &too_long));
  EXPECT_TRUE(too_long);
}

TEST(HardeningInput, SystemTextWithInvalidUtf8IsBadInputForRunAndChat) {
  for (const char* command : {"run", "chat"}) {
    const Cli r = cli(std::string(command) + " -m '" + kData +
                      "/tiny' --ctx 64 -n 1 -p hi --system \"$(printf 'ok\\377')\"");
    if (std::string(command) == "chat" && r.code == 2 && contains(r.err, "-p")) continue;  // chat takes no -p
    EXPECT_EQ(r.code, 3) << command << ": " << r.err;
    EXPECT_TRUE(contains(r.err, "--system")) << r.err;
  }
  const Cli chat = cli("chat -m '" + kData + "/tiny' --ctx 64 -n 1 --system \"$(printf 'ok\\377')\"");
  EXPECT_EQ(chat.code, 3) << chat.err;
}

}  // namespace
// Issue #16: the library names its options in library terms (LoadOptions::context, ...), not
// this CLI's flags; the CLI shows the same errors with its flags (cli_terms).
TEST(HardeningApi, LibraryErrorsNameOptionsNotFlags) {
  std::shared_ptr<Model> model = load(kData + "/tiny", 16);
  ASSERT_TRUE(model);
  auto s = model->new_session().value();
  Status st = s->feed_text(std::string(200, 'x'));
  EXPECT_EQ(st.code(), ErrorCode::kOutOfRange);
  EXPECT_TRUE(contains(st.message(), "raise LoadOptions::context")) << st.message();
  st = s->feed_image(kData + "/images/rgb_37x23.bmp");
  EXPECT_EQ(st.code(), ErrorCode::kUnsupported);
  EXPECT_TRUE(contains(st.message(), "(LoadOptions::mmproj)")) << st.message();
  for (const Status& e : {st, s->feed_text(std::string(200, 'x'))})
    EXPECT_FALSE(contains(e.message(), "--")) << e.message();

  Cli r = cli("run -m '" + kData + "/tiny' --raw --ctx 16 -n 1 -p '" + std::string(200, 'x') + "'");
  EXPECT_EQ(r.code, 4);
  EXPECT_TRUE(contains(r.err, "raise --ctx (the model allows up to")) << r.err;
  EXPECT_FALSE(contains(r.err, "LoadOptions")) << r.err;
  r = cli("run -m '" + kData + "/tiny' --image '" + kData + "/images/rgb_37x23.bmp' -n 1 -p hi");
  EXPECT_EQ(r.code, 3);
  EXPECT_TRUE(contains(r.err, "attach its projector (--mmproj)")) << r.err;
}

// Issue #16: an image from encoded bytes in memory is the same image as from its file, and the
// file limits and errors apply ("image bytes" names it).
TEST(HardeningApi, ImageBytesInMemoryEqualTheFile) {
  LoadOptions o;
  o.backend = BackendKind::kCpu;
  o.threads = 1;
  o.context = 256;
  auto loaded = Model::load(kData + "/tiny-vision", o);
  ASSERT_TRUE(loaded.ok()) << loaded.status().to_string();
  std::shared_ptr<Model> model = *loaded;
  const std::string path = kData + "/images/rgb_37x23.bmp";
  auto a = model->new_session().value(), b = model->new_session().value();
  Status st = a->feed_image(path);
  ASSERT_TRUE(st.ok()) << st.to_string();
  const std::string bytes = slurp(path);
  ASSERT_FALSE(bytes.empty());
  st = b->feed_image_bytes(bytes);
  ASSERT_TRUE(st.ok()) << st.to_string();
  EXPECT_EQ(a->tokens(), b->tokens());
  EXPECT_EQ(testutil::to_vector(a->last_logits()), testutil::to_vector(b->last_logits()));
  auto c = model->new_session().value();
  st = c->feed_image_bytes(bytes.substr(0, 40));
  EXPECT_EQ(st.code(), ErrorCode::kInvalidFile) << st.to_string();
  EXPECT_TRUE(contains(st.message(), "image bytes: truncated BMP")) << st.message();
  st = c->feed_image_bytes("");
  EXPECT_EQ(st.code(), ErrorCode::kInvalidFile) << st.to_string();
  EXPECT_EQ(c->position(), 0);
}

}  // namespace gemma3
