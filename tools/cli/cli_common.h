// Shared pieces of the `gemma3` command-line tool: a small declarative argument parser, the
// one mapping from library errors to exit codes, Ctrl-C handling, and formatting helpers.
//
// The library returns errors; the CLI turns them into one clear line on stderr and an exit
// code (docs/cli.md):
//   0 ok, 1 internal error, 2 bad usage, 3 bad input file/model, 4 out of memory/context,
//   130 interrupted.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "gemma3/gemma3.h"
#include "gemma3/status.h"

namespace gemma3::cli {

enum ExitCode : int {
  kExitOk = 0,
  kExitInternal = 1,
  kExitUsage = 2,
  kExitBadInput = 3,
  kExitResource = 4,  // out of memory, or the prompt does not fit the context
  kExitInterrupted = 130,
};

// The one place library ErrorCodes become exit codes.
int exit_code_for(ErrorCode code);

// The library names its options in its own terms (LoadOptions::context, KvType::kQ8_0, ...):
// the message with each replaced by the flag that sets it here (--ctx, q8_0, ...).
std::string cli_terms(std::string_view message);
// Prints "gemma3 <command>: <message>" (in cli_terms) on stderr and returns `code` (for
// `return fail(...)`).
int fail(std::string_view command, int code, std::string_view message);
// Same for a library Status: the exit code comes from exit_code_for(status.code()).
int fail(std::string_view command, const Status& status);

// ---- argument parsing ----------------------------------------------------------------------

// A flag-table parser. Options are registered with their spellings ("-n,--n-predict"), a
// metavariable for the help text and a target; parse() fills the targets in argv order. A
// flag given twice takes the last value, except list options, which append.
class ArgParser {
 public:
  // `command`: "run" (messages say "gemma3 run: ..."); `synopsis`: the usage line(s) after
  // "usage: gemma3 <command> "; `description`: a paragraph printed under the usage.
  ArgParser(std::string command, std::string synopsis, std::string description);

  void add_flag(std::string names, bool* target, std::string help);
  void add_option(std::string names, std::string metavar, std::string* target, std::string help);
  void add_option(std::string names, std::string metavar, int* target, std::string help);
  void add_option(std::string names, std::string metavar, float* target, std::string help);
  void add_option(std::string names, std::string metavar, uint64_t* target, std::string help);
  void add_list(std::string names, std::string metavar, std::vector<std::string>* target, std::string help);
  // An option whose value must be one of `choices`.
  void add_choice(std::string names, std::vector<std::string> choices, std::string* target, std::string help);

  // Parses argv[first..argc). -h/--help is always known; when present, `help_requested()` is
  // true and nothing else is checked. Returns an invalid-argument Status with a one-line
  // message ("--temp expects a number, got 'abc'") on the first problem. Positional arguments
  // are refused. "--name=value" is accepted for options.
  Status parse(int argc, char** argv, int first);

  bool help_requested() const { return help_; }
  // Was this option (any of its spellings) given on the command line?
  bool given(std::string_view name) const;
  std::string help_text() const;
  const std::string& command() const { return command_; }

 private:
  struct Option {
    std::vector<std::string> names;  // "-n", "--n-predict"
    std::string metavar;             // empty for flags
    std::string help;
    std::function<Status(const std::string& name, const std::string& value)> set;
    bool seen = false;
  };
  Option* find(std::string_view name);
  void add(std::string names, std::string metavar, std::string help,
           std::function<Status(const std::string&, const std::string&)> set);

  std::string command_, synopsis_, description_;
  std::vector<Option> options_;
  bool help_ = false;
};

// Parses a full decimal number; nullopt on anything else (trailing junk, overflow, empty).
std::optional<int64_t> parse_int(std::string_view s);
std::optional<double> parse_double(std::string_view s);

// ---- options shared by commands that load a model ------------------------------------------

// -m, --ctx, -t, --backend, --kv-type, --chunk: the LoadOptions of run, chat and perplexity.
struct ModelFlags {
  std::string model;
  int context = 0;
  int threads = 0;
  int chunk = 0;  // LoadOptions::prefill_chunk: 0 is the backend's choice
  std::string backend = "auto";
  std::string kv_type = "bf16";
  bool verbose = false;
  std::string mmproj;              // --mmproj: vision projector GGUF beside a text GGUF
  bool pan_and_scan = false;       // --pan-and-scan: images also as Pan & Scan crops
  bool batch_invariant = false;    // --batch-invariant: logits independent of the step split
  std::string weights = "stored";  // --weights stored|fp8

  void add_to(ArgParser& parser, bool with_context = true);
  // Checks ranges after parsing (-m present, --ctx >= 0, ...); returns a usage error.
  Status check() const;
  LoadOptions load_options() const;
};

// Sampling flags shared by run and chat. Defaults follow Gemma 3's recommended settings
// (generation_config.json of the -it models: top_k 64, top_p 0.95, temperature 1.0, min_p 0).
struct SamplingFlags {
  float temperature = 1.0f;
  int top_k = 64;
  float top_p = 0.95f;
  float min_p = 0.0f;
  float repeat_penalty = 1.0f;
  int repeat_last_n = 64;
  uint64_t seed = 0;
  int n_predict = 256;
  std::vector<std::string> stop;
  std::string system;

  void add_to(ArgParser& parser);
  Status check(const ArgParser& parser);  // also picks a random seed when --seed is absent
  GenerateOptions generate_options(const std::atomic<bool>* cancel) const;
};

// Loads a model, timing it. Prints "loading MODEL" progress to stderr when verbose.
struct LoadedModel {
  std::shared_ptr<Model> model;
  double load_seconds = 0;
};
Result<LoadedModel> load_model(const ModelFlags& flags);

// ---- input ----------------------------------------------------------------------------------

// Input limits (docs/reliability.md). A prompt for run is read with at most kMaxPromptBytes
// before the model loads (128K tokens, the longest Gemma 3 context, at 96 bytes each: more than
// the most input one Gemma 3 token takes, 93 bytes: 31 literal U+2581); after loading,
// prompt_limit_bytes(model) bounds it exactly. A whole text for perplexity or tokenize may be up
// to kMaxTextFileBytes.
inline constexpr uint64_t kMaxPromptBytes = uint64_t{131072} * 96;
inline constexpr uint64_t kMaxTextFileBytes = uint64_t{1} << 30;
// The most bytes of text a context of this model can hold: context_length() x the most input
// bytes one token takes (Tokenizer::max_piece_bytes). A longer text cannot fit whatever it says, so it is
// refused (exit 4) before tokenizing.
uint64_t prompt_limit_bytes(const Model& model);
// kOutOfRange naming `what`, its size, the limit and the context when text.size() > limit.
Status check_prompt_fits(const Model& model, std::string_view what, uint64_t bytes);

// Reads a whole file (or a pipe, /dev/stdin) of at most max_bytes; not-found / invalid-file
// Status naming the path on failure, out-of-range over the limit.
Result<std::string> read_file(const std::string& path, uint64_t max_bytes);
// Byte offset of the first invalid UTF-8 sequence, or nullopt when `s` is valid UTF-8.
std::optional<size_t> find_invalid_utf8(std::string_view s);
// Prompt text from -p or -f (exactly one must be set), checked to be non-empty valid UTF-8,
// the file at most max_bytes. `what` names it in messages ("prompt", "text").
Result<std::string> read_prompt(const std::string& prompt, const std::string& file, const std::string& what,
                                uint64_t max_bytes);
// --system must be valid UTF-8 (an invalid-file error, exit 3, as for the prompt).
Status check_system_text(const std::string& system);

// ---- Ctrl-C ---------------------------------------------------------------------------------

// Installs a SIGINT handler: the first Ctrl-C sets interrupt_flag() (pass it as
// GenerateOptions::cancel); a second one while the flag is still set exits with 130.
void install_interrupt_handler();
std::atomic<bool>& interrupt_flag();

// ---- formatting -----------------------------------------------------------------------------

// "96.00 MiB", "2.25 GiB", "512 B"
std::string human_bytes(uint64_t bytes);
// A token's text for display on one line: printable UTF-8 kept, control bytes and bytes of an
// invalid sequence escaped as \n, \t, \xNN.
std::string escape_for_display(std::string_view s);

}  // namespace gemma3::cli
