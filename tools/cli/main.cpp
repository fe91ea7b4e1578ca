// gemma3: command-line front end of libgemma3. One file per command (cmd_*.cpp); shared flag
// parsing and the error -> exit code mapping live in cli_common.*. See docs/cli.md.
#include <cstdio>
#include <cstring>
#include <string_view>

#include "cli_common.h"
#include "commands.h"

namespace {

constexpr const char* kUsage =
    "usage: gemma3 <command> [options]\n"
    "\n"
    "commands:\n"
    "  run         generate a reply to one prompt (chat template, or --raw text)\n"
    "  chat        interactive multi-turn chat (terminal or pipe)\n"
    "  perplexity  perplexity of a text file, computed like llama-perplexity\n"
    "  tokenize    show the token ids and pieces of a text\n"
    "  info        architecture, tensor types and the memory plan of a checkpoint\n"
    "  bench       prompt and generation speed, llama-bench style (pp/tg tokens/s)\n"
    "  serve       an OpenAI-compatible HTTP server (chat/completions, many requests at once)\n"
    "  make-model  write a random-weight Gemma 3 checkpoint (any size and type) for tests\n"
    "\n"
    "`gemma3 <command> --help` lists a command's options. `gemma3 --version` prints the version.\n"
    "exit codes: 0 ok, 1 internal error, 2 bad usage, 3 bad input file/model,\n"
    "            4 out of memory/context, 130 interrupted\n";

}  // namespace

int main(int argc, char** argv) {
  using namespace gemma3::cli;
  if (argc < 2) {
    std::fputs(kUsage, stdout);
    return kExitOk;
  }
  const std::string_view cmd = argv[1];
  if (cmd == "-h" || cmd == "--help" || cmd == "help") {
    std::fputs(kUsage, stdout);
    return kExitOk;
  }
  if (cmd == "--version" || cmd == "-V") {
    std::printf("gemma3 %s\n", gemma3::version());
    return kExitOk;
  }
  if (cmd == "run") return cmd_run(argc, argv);
  if (cmd == "chat") return cmd_chat(argc, argv);
  if (cmd == "perplexity") return cmd_perplexity(argc, argv);
  if (cmd == "tokenize") return cmd_tokenize(argc, argv);
  if (cmd == "info") return cmd_info(argc, argv);
  if (cmd == "bench") return cmd_bench(argc, argv);
  if (cmd == "make-model") return cmd_make_model(argc, argv);
  if (cmd == "serve") return cmd_serve(argc, argv);
  std::fprintf(
      stderr,
      "gemma3: unknown command '%s' (commands: run, chat, perplexity, tokenize, info, bench, serve,\n"
      "make-model; see gemma3 --help)\n",
      argv[1]);
  return kExitUsage;
}
