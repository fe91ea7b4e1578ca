// Many prompts at once through one Engine (gemma3/engine.h), built against the installed
// libgemma3:
//   batch MODEL MAX_TOKENS PROMPT [PROMPT...]
// Submits every prompt as raw text, decodes them together (greedy) and prints each completion
// on its own line (a newline in it shown as \n), in the order given, once all have finished.
#include <gemma3/engine.h>
#include <gemma3/gemma3.h>

#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s MODEL MAX_TOKENS PROMPT [PROMPT...]\n", argv[0]);
    return 2;
  }
  gemma3::LoadOptions load;
  load.backend = gemma3::BackendKind::kCpu;
  auto model = gemma3::Model::load(argv[1], load);
  if (!model.ok()) {
    std::fprintf(stderr, "error: %s\n", model.status().to_string().c_str());
    return 3;
  }
  const int n = argc - 3;
  gemma3::EngineOptions eo;
  eo.max_sequences = n < 8 ? n : 8;
  auto engine = gemma3::Engine::create(*model, eo);
  if (!engine.ok()) {
    std::fprintf(stderr, "error: %s\n", engine.status().to_string().c_str());
    return 3;
  }
  std::vector<std::string> text(n);
  std::mutex mu;
  std::condition_variable cv;
  int done = 0, failed = 0;
  for (int i = 0; i < n; ++i) {
    gemma3::EngineRequest r;
    r.text = argv[3 + i];
    r.options.max_tokens = std::atoi(argv[2]);
    text[i] = r.text;
    // Callbacks run on the engine's thread; each request appends to its own string.
    auto id = (*engine)->submit(
        std::move(r),
        [&text, i](const gemma3::TokenEvent& e) {
          text[i] += e.text;
          return true;
        },
        [&](const gemma3::Result<gemma3::GenerateResult>& res) {
          std::lock_guard<std::mutex> lock(mu);
          if (!res.ok()) {
            std::fprintf(stderr, "error: request %d: %s\n", i, res.status().to_string().c_str());
            ++failed;
          }
          ++done;
          cv.notify_all();
        });
    if (!id.ok()) {
      std::fprintf(stderr, "error: %s\n", id.status().to_string().c_str());
      return 3;
    }
  }
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return done == n; });
  for (const std::string& t : text) {
    for (char c : t) c == '\n' ? (void)std::fputs("\\n", stdout) : (void)std::putchar(c);
    std::putchar('\n');
  }
  const gemma3::EngineStats st = (*engine)->stats();
  std::fprintf(stderr, "%d requests, %llu generated tokens in %llu steps\n", n,
               static_cast<unsigned long long>(st.generated_tokens),
               static_cast<unsigned long long>(st.steps));
  return failed ? 1 : 0;
}
