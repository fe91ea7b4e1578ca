// A minimal program built against the installed libgemma3 (find_package(gemma3)):
//   generate MODEL "prompt" [max_tokens]
// Loads the model, feeds the prompt as plain text and prints a greedy continuation.
#include <gemma3/gemma3.h>

#include <cstdio>
#include <cstdlib>
#include <string>

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s MODEL PROMPT [MAX_TOKENS]\n", argv[0]);
    return 2;
  }
  gemma3::LoadOptions load;
  load.backend = gemma3::BackendKind::kCpu;
  auto model = gemma3::Model::load(argv[1], load);
  if (!model.ok()) {
    std::fprintf(stderr, "error: %s\n", model.status().to_string().c_str());
    return 3;
  }
  auto session = (*model)->new_session();
  if (!session.ok()) {
    std::fprintf(stderr, "error: %s\n", session.status().to_string().c_str());
    return 4;
  }
  if (gemma3::Status s = (*session)->feed_text(argv[2]); !s.ok()) {
    std::fprintf(stderr, "error: %s\n", s.to_string().c_str());
    return 3;
  }
  gemma3::GenerateOptions gen;
  gen.max_tokens = argc > 3 ? std::atoi(argv[3]) : 32;
  std::fputs(argv[2], stdout);
  gemma3::Result<gemma3::GenerateResult> s = (*session)->generate(gen, [](const gemma3::TokenEvent& e) {
    std::fwrite(e.text.data(), 1, e.text.size(), stdout);
    std::fflush(stdout);
    return true;
  });
  std::fputc('\n', stdout);
  if (!s.ok()) {
    std::fprintf(stderr, "error: %s\n", s.status().to_string().c_str());
    return 1;
  }
  const gemma3::Stats& st = (*session)->stats();
  std::fprintf(stderr, "%d prompt tokens, %d generated in %.2f s (stopped: %s)\n", st.prompt_tokens,
               st.generated_tokens, st.prefill_seconds + st.decode_seconds,
               gemma3::finish_reason_name(s->finish));
  return 0;
}
