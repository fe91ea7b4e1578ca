// Entry points of the `gemma3` subcommands. Each takes main's argc/argv (argv[1] is the
// command name; its options start at argv[2]) and returns the process exit code.
#pragma once

#include "gemma3/gemma3.h"

namespace gemma3::cli {

int cmd_run(int argc, char** argv);
int cmd_chat(int argc, char** argv);
int cmd_perplexity(int argc, char** argv);
int cmd_tokenize(int argc, char** argv);
int cmd_info(int argc, char** argv);
int cmd_bench(int argc, char** argv);
int cmd_make_model(int argc, char** argv);
int cmd_serve(int argc, char** argv);

// Prompt and generation counts and speeds of a session, on stderr (run and chat --verbose).
void print_session_stats(const Stats& stats);

}  // namespace gemma3::cli
