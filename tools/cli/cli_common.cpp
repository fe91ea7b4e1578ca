#include "cli_common.h"

#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>

#include "gemma3/util.h"

namespace gemma3::cli {

int exit_code_for(ErrorCode code) {
  switch (code) {
    case ErrorCode::kOk: return kExitOk;
    case ErrorCode::kInvalidArgument: return kExitUsage;
    case ErrorCode::kNotFound:
    case ErrorCode::kInvalidFile:
    case ErrorCode::kUnsupported: return kExitBadInput;
    case ErrorCode::kOutOfRange:
    case ErrorCode::kOutOfMemory:
    case ErrorCode::kUnavailable: return kExitResource;
    case ErrorCode::kCancelled: return kExitInterrupted;
    case ErrorCode::kInternal: return kExitInternal;
  }
  return kExitInternal;
}

std::string cli_terms(std::string_view message) {
  // Longest first: "LoadOptions::kv_type = " before "LoadOptions::kv_type".
  static const std::pair<std::string_view, std::string_view> kTerms[] = {
      {"LoadOptions::kv_type = ", "--kv-type "},
      {"LoadOptions::kv_type", "--kv-type"},
      {"LoadOptions::context", "--ctx"},
      {"LoadOptions::prefill_chunk", "--chunk"},
      {"LoadOptions::mmproj", "--mmproj"},
      {"LoadOptions::fp8_weights", "--weights fp8"},
      {"LoadOptions::batch_invariant", "--batch-invariant"},
      {"LoadOptions::threads", "--threads"},
      {"KvType::kBF16", "bf16"},
      {"KvType::kF32", "f32"},
      {"KvType::kQ8_0", "q8_0"},
      {"KvType::kF8", "fp8"},
      {"BackendKind::kCpu", "--backend cpu"},
  };
  std::string out(message);
  for (const auto& [term, flag] : kTerms)
    for (size_t at = out.find(term); at != std::string::npos; at = out.find(term, at + flag.size()))
      out.replace(at, term.size(), flag);
  return out;
}

int fail(std::string_view command, int code, std::string_view message) {
  std::fflush(stdout);
  const std::string text = cli_terms(message);  // the library's option names as this CLI's flags
  std::fprintf(stderr, "gemma3 %.*s: %s\n", static_cast<int>(command.size()), command.data(), text.c_str());
  return code;
}

int fail(std::string_view command, const Status& status) {
  return fail(command, exit_code_for(status.code()), status.to_string());
}

// ---- numbers --------------------------------------------------------------------------------

std::optional<int64_t> parse_int(std::string_view s) {
  int64_t v = 0;
  const char* end = s.data() + s.size();
  auto [ptr, ec] = std::from_chars(s.data(), end, v);
  if (s.empty() || ec != std::errc() || ptr != end) return std::nullopt;
  return v;
}

std::optional<double> parse_double(std::string_view s) {
  // strtod accepts leading spaces, "inf" and "nan"; a sampling parameter wants none of them.
  if (s.empty() || std::isspace(static_cast<unsigned char>(s[0]))) return std::nullopt;
  std::string z(s);
  errno = 0;
  char* end = nullptr;
  const double v = std::strtod(z.c_str(), &end);
  // ERANGE also flags underflow (1e-320): that value is as near 0 as a double gets, and is
  // kept (a temperature that tiny is greedy); only overflow is refused.
  const bool overflow = errno == ERANGE && std::fabs(v) > 1.0;
  if (end != z.c_str() + z.size() || overflow || !std::isfinite(v)) return std::nullopt;
  return v;
}

// ---- ArgParser ------------------------------------------------------------------------------

namespace {

std::vector<std::string> split_names(const std::string& names) {
  std::vector<std::string> out;
  std::stringstream ss(names);
  std::string n;
  while (std::getline(ss, n, ',')) out.push_back(n);
  return out;
}

}  // namespace

ArgParser::ArgParser(std::string command, std::string synopsis, std::string description)
    : command_(std::move(command)), synopsis_(std::move(synopsis)), description_(std::move(description)) {}

void ArgParser::add(std::string names, std::string metavar, std::string help,
                    std::function<Status(const std::string&, const std::string&)> set) {
  options_.push_back({split_names(names), std::move(metavar), std::move(help), std::move(set)});
}

void ArgParser::add_flag(std::string names, bool* target, std::string help) {
  add(std::move(names), "", std::move(help), [target](const std::string&, const std::string&) {
    *target = true;
    return ok_status();
  });
}

void ArgParser::add_option(std::string names, std::string metavar, std::string* target, std::string help) {
  add(std::move(names), std::move(metavar), std::move(help),
      [target](const std::string&, const std::string& v) {
        *target = v;
        return ok_status();
      });
}

void ArgParser::add_option(std::string names, std::string metavar, int* target, std::string help) {
  add(std::move(names), std::move(metavar), std::move(help),
      [target](const std::string& name, const std::string& v) {
        const auto n = parse_int(v);
        if (!n || *n < INT32_MIN || *n > INT32_MAX)
          return invalid_argument(fmt::format("{} expects an integer, got '{}'", name, v));
        *target = static_cast<int>(*n);
        return ok_status();
      });
}

void ArgParser::add_option(std::string names, std::string metavar, float* target, std::string help) {
  add(std::move(names), std::move(metavar), std::move(help),
      [target](const std::string& name, const std::string& v) {
        const auto d = parse_double(v);
        if (!d) return invalid_argument(fmt::format("{} expects a number, got '{}'", name, v));
        *target = static_cast<float>(*d);
        return ok_status();
      });
}

void ArgParser::add_option(std::string names, std::string metavar, uint64_t* target, std::string help) {
  add(std::move(names), std::move(metavar), std::move(help),
      [target](const std::string& name, const std::string& v) {
        uint64_t n = 0;
        auto [ptr, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
        if (v.empty() || ec != std::errc() || ptr != v.data() + v.size())
          return invalid_argument(fmt::format("{} expects a non-negative integer, got '{}'", name, v));
        *target = n;
        return ok_status();
      });
}

void ArgParser::add_list(std::string names, std::string metavar, std::vector<std::string>* target,
                         std::string help) {
  add(std::move(names), std::move(metavar), std::move(help),
      [target](const std::string&, const std::string& v) {
        target->push_back(v);
        return ok_status();
      });
}

void ArgParser::add_choice(std::string names, std::vector<std::string> choices, std::string* target,
                           std::string help) {
  std::string metavar;
  for (const auto& c : choices) metavar += (metavar.empty() ? "" : "|") + c;
  add(std::move(names), metavar, std::move(help),
      [target, choices, metavar](const std::string& name, const std::string& v) {
        for (const auto& c : choices) {
          if (v == c) {
            *target = v;
            return ok_status();
          }
        }
        return invalid_argument(fmt::format("{} expects one of {}, got '{}'", name, metavar, v));
      });
}

ArgParser::Option* ArgParser::find(std::string_view name) {
  for (Option& o : options_) {
    for (const auto& n : o.names) {
      if (n == name) return &o;
    }
  }
  return nullptr;
}

bool ArgParser::given(std::string_view name) const {
  for (const Option& o : options_) {
    for (const auto& n : o.names) {
      if (n == name) return o.seen;
    }
  }
  return false;
}

Status ArgParser::parse(int argc, char** argv, int first) {
  for (int i = first; i < argc; ++i) {
    if (std::strcmp(argv[i], "-h") == 0 || std::strcmp(argv[i], "--help") == 0) {
      help_ = true;
      return ok_status();
    }
  }
  for (int i = first; i < argc; ++i) {
    std::string arg = argv[i];
    std::optional<std::string> inline_value;
    if (arg.rfind("--", 0) == 0) {
      if (const size_t eq = arg.find('='); eq != std::string::npos) {
        inline_value = arg.substr(eq + 1);
        arg.resize(eq);
      }
    }
    if (arg.empty() || arg[0] != '-' || arg == "-") {
      return invalid_argument(fmt::format("unexpected argument '{}' (see gemma3 {} --help)", arg, command_));
    }
    Option* opt = find(arg);
    if (!opt)
      return invalid_argument(fmt::format("unknown option '{}' (see gemma3 {} --help)", arg, command_));
    std::string value;
    if (opt->metavar.empty()) {
      if (inline_value) return invalid_argument(fmt::format("{} takes no value", arg));
    } else if (inline_value) {
      value = *inline_value;
    } else {
      if (i + 1 >= argc) return invalid_argument(fmt::format("{} expects a value ({})", arg, opt->metavar));
      value = argv[++i];
    }
    GEMMA3_TRY(opt->set(arg, value));
    opt->seen = true;
  }
  return ok_status();
}

std::string ArgParser::help_text() const {
  std::string out = fmt::format("usage: gemma3 {} {}\n\n{}\n\noptions:\n", command_, synopsis_, description_);
  std::vector<std::string> lefts;
  size_t width = 0;
  for (const Option& o : options_) {
    std::string left;
    for (const auto& n : o.names) left += (left.empty() ? "" : ", ") + n;
    if (!o.metavar.empty()) left += " " + o.metavar;
    width = std::max(width, left.size());
    lefts.push_back(left);
  }
  width = std::min<size_t>(width, 30);
  for (size_t i = 0; i < options_.size(); ++i) {
    if (lefts[i].size() > width) {
      out += fmt::format("  {}\n  {:{}}  {}\n", lefts[i], "", width, options_[i].help);
    } else {
      out += fmt::format("  {:{}}  {}\n", lefts[i], width, options_[i].help);
    }
  }
  out += fmt::format("  {:{}}  {}\n", "-h, --help", width, "show this help");
  return out;
}

// ---- shared model and sampling flags --------------------------------------------------------

void ModelFlags::add_to(ArgParser& p, bool with_context) {
  p.add_option("-m,--model", "PATH", &model, "model: a .gguf file or a Hugging Face folder (required)");
  if (with_context)
    p.add_option("--ctx", "N", &context, "context length in tokens (default: min(model max, 8192))");
  p.add_option("-t,--threads", "N", &threads, "CPU threads (default: one per core)");
  p.add_choice("--backend", {"auto", "cpu", "cuda"}, &backend, "compute backend (default: auto)");
  p.add_choice("--kv-type", {"bf16", "f32", "q8_0", "fp8"}, &kv_type,
               "KV cache element type; q8_0 and fp8 halve it (default: bf16)");
  p.add_option("--chunk", "N", &chunk,
               fmt::format("tokens per prefill step (default: {} on the CPU, {} with CUDA)", kCpuPrefillChunk,
                           kCudaPrefillChunk));
  p.add_choice("--weights", {"stored", "fp8"}, &weights,
               "weight types on the device: as stored, or the decoder's bf16/f16/f32 matrices as fp8 e4m3\n"
               "(CUDA only; lookups, norms and the vision tower stay as stored)");
  p.add_flag("--batch-invariant", &batch_invariant,
             "CPU: a token's logits do not depend on how the text was split across steps (evaluation;\n"
             "decode runs the prefill path, which is slower)");
  p.add_flag("-v,--verbose", &verbose, "print model details and per-step information to stderr");
  p.add_option("--mmproj", "FILE", &mmproj,
               "vision tower + projector GGUF (llama.cpp mmproj) for a text GGUF");
  p.add_flag("--pan-and-scan", &pan_and_scan,
             "images: also encode Pan & Scan crops of wide/tall images (as HF's do_pan_and_scan)");
}

Status ModelFlags::check() const {
  if (model.empty()) return invalid_argument("-m MODEL is required");
  if (context < 0) return invalid_argument(fmt::format("--ctx must be >= 0, got {}", context));
  if (threads < 0 || threads > kMaxThreads)
    return invalid_argument(fmt::format("--threads must be in [0, {}], got {}", kMaxThreads, threads));
  if (chunk < 0)
    return invalid_argument(fmt::format("--chunk must be >= 1 (or 0: the default), got {}", chunk));
  return ok_status();
}

LoadOptions ModelFlags::load_options() const {
  LoadOptions o;
  o.backend = backend == "cpu"    ? BackendKind::kCpu
              : backend == "cuda" ? BackendKind::kCuda
                                  : BackendKind::kAuto;
  o.threads = threads;
  o.context = context;
  o.kv_type = kv_type_from_name(kv_type).value_or(KvType::kBF16);  // add_choice admits only known names
  o.prefill_chunk = chunk;
  o.progress = verbose;
  o.mmproj = mmproj;
  o.pan_and_scan = pan_and_scan;
  o.fp8_weights = weights == "fp8";
  o.batch_invariant = batch_invariant;
  return o;
}

void SamplingFlags::add_to(ArgParser& p) {
  p.add_option("-n,--n-predict", "N", &n_predict,
               "tokens to generate; -1: until a stop token (default: 256)");
  p.add_option("--temp", "T", &temperature, "temperature; 0 = greedy (default: 1.0)");
  p.add_option("--top-k", "K", &top_k, "keep the K most likely tokens; 0 = off (default: 64)");
  p.add_option("--top-p", "P", &top_p, "nucleus sampling; 1 = off (default: 0.95)");
  p.add_option("--min-p", "P", &min_p, "drop tokens below P x the top probability; 0 = off (default: 0)");
  p.add_option("--repeat-penalty", "R", &repeat_penalty, "penalty on recent tokens; 1 = off (default: 1.0)");
  p.add_option("--repeat-last-n", "N", &repeat_last_n, "tokens the repeat penalty looks back (default: 64)");
  p.add_option("--seed", "S", &seed, "sampling seed (default: random, printed with --verbose)");
  p.add_list("--stop", "STR", &stop, "stop when the output contains STR (repeatable)");
  p.add_option("--system", "TEXT", &system, "system message (prepended to the first user turn)");
}

Status SamplingFlags::check(const ArgParser& p) {
  if (n_predict < -1) return invalid_argument(fmt::format("-n must be -1 or >= 0, got {}", n_predict));
  if (!(temperature >= 0) || std::isinf(temperature))
    return invalid_argument(fmt::format("--temp must be a finite number >= 0, got {}", temperature));
  if (top_k < 0) return invalid_argument(fmt::format("--top-k must be >= 0, got {}", top_k));
  if (!(top_p > 0 && top_p <= 1))
    return invalid_argument(fmt::format("--top-p must be in (0, 1], got {}", top_p));
  if (!(min_p >= 0 && min_p <= 1))
    return invalid_argument(fmt::format("--min-p must be in [0, 1], got {}", min_p));
  if (!(repeat_penalty > 0) || std::isinf(repeat_penalty))
    return invalid_argument(fmt::format("--repeat-penalty must be > 0, got {}", repeat_penalty));
  if (repeat_last_n < 0)
    return invalid_argument(fmt::format("--repeat-last-n must be >= 0, got {}", repeat_last_n));
  for (const auto& s : stop) {
    if (s.empty()) return invalid_argument("--stop expects a non-empty string");
  }
  if (!p.given("--seed")) seed = (uint64_t{std::random_device{}()} << 32) | std::random_device{}();
  return ok_status();
}

GenerateOptions SamplingFlags::generate_options(const std::atomic<bool>* cancel) const {
  GenerateOptions g;
  g.max_tokens = n_predict;
  g.sampling.temperature = temperature;
  g.sampling.top_k = top_k;
  g.sampling.top_p = top_p;
  g.sampling.min_p = min_p;
  g.sampling.repeat_penalty = repeat_penalty;
  g.sampling.repeat_last_n = repeat_last_n;
  g.sampling.seed = seed;
  g.stop_strings = stop;
  g.cancel = cancel;
  return g;
}

Result<LoadedModel> load_model(const ModelFlags& flags) {
  const auto t0 = std::chrono::steady_clock::now();
  auto model = Model::load(flags.model, flags.load_options());
  if (!model.ok()) return model.status();
  LoadedModel out;
  out.model = std::move(model).value();
  out.load_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (flags.verbose) {
    std::fprintf(stderr, "model: %s\ncontext: %d tokens, vocab: %d\n", out.model->description().c_str(),
                 out.model->context_length(), out.model->vocab_size());
  }
  return out;
}

// ---- input ----------------------------------------------------------------------------------

Result<std::string> read_file(const std::string& path, uint64_t max_bytes) {
  return read_file_limited(path, max_bytes, "text file", FileKind::kStream, ErrorCode::kOutOfRange);
}

uint64_t prompt_limit_bytes(const Model& model) {
  return static_cast<uint64_t>(model.context_length()) * std::max(1, model.tokenizer().max_piece_bytes());
}

Status check_prompt_fits(const Model& model, std::string_view what, uint64_t bytes) {
  const uint64_t limit = prompt_limit_bytes(model);
  if (bytes <= limit) return ok_status();
  return out_of_range(fmt::format(
      "the {} is {} bytes, but a context of {} tokens holds at most {} bytes of text (no token takes "
      "more than {} bytes); raise --ctx or shorten it",
      what, bytes, model.context_length(), limit, limit / std::max(1, model.context_length())));
}

Status check_system_text(const std::string& system) {
  if (const auto bad = find_invalid_utf8(system))
    return invalid_file(fmt::format("--system is not valid UTF-8: byte 0x{:02X} at offset {} of {}",
                                    static_cast<uint8_t>(system[*bad]), *bad, system.size()));
  return ok_status();
}

std::optional<size_t> find_invalid_utf8(std::string_view s) {
  const size_t bad = gemma3::find_invalid_utf8(s);
  return bad == std::string_view::npos ? std::nullopt : std::optional<size_t>(bad);
}

Result<std::string> read_prompt(const std::string& prompt, const std::string& file, const std::string& what,
                                uint64_t max_bytes) {
  if (!prompt.empty() && !file.empty()) return invalid_argument("give either -p or -f, not both");
  std::string text;
  std::string source;
  if (!file.empty()) {
    GEMMA3_ASSIGN_OR_RETURN(text, read_file(file, max_bytes));
    source = fmt::format("'{}'", file);
  } else {
    text = prompt;
    source = "-p";
  }
  if (text.empty()) {
    return file.empty() ? invalid_argument(fmt::format("the {} is empty: give -p TEXT or -f FILE", what))
                        : invalid_file(fmt::format("the {} file '{}' is empty", what, file));
  }
  if (const auto bad = find_invalid_utf8(text)) {
    return invalid_file(fmt::format("the {} ({}) is not valid UTF-8: byte 0x{:02X} at offset {} of {}", what,
                                    source, static_cast<uint8_t>(text[*bad]), *bad, text.size()));
  }
  return text;
}

// ---- Ctrl-C ---------------------------------------------------------------------------------

std::atomic<bool>& interrupt_flag() {
  static std::atomic<bool> flag{false};
  return flag;
}

namespace {

extern "C" void on_sigint(int) {
  // Only async-signal-safe calls here: an atomic exchange, write and _exit.
  if (interrupt_flag().exchange(true)) {
    static const char kMsg[] = "\ninterrupted\n";
    [[maybe_unused]] ssize_t r = ::write(STDERR_FILENO, kMsg, sizeof(kMsg) - 1);
    ::_exit(kExitInterrupted);
  }
}

}  // namespace

void install_interrupt_handler() {
  static_assert(std::atomic<bool>::is_always_lock_free, "the SIGINT handler needs a lock-free flag");
  struct sigaction sa;
  std::memset(&sa, 0, sizeof(sa));
  sa.sa_handler = on_sigint;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;  // a Ctrl-C while reading stdin must not look like end of input
  sigaction(SIGINT, &sa, nullptr);
}

// ---- formatting -----------------------------------------------------------------------------

std::string human_bytes(uint64_t bytes) {
  constexpr double kKiB = 1024.0, kMiB = kKiB * 1024, kGiB = kMiB * 1024;
  const double b = static_cast<double>(bytes);
  if (b >= kGiB) return fmt::format("{:.2f} GiB", b / kGiB);
  if (b >= kMiB) return fmt::format("{:.2f} MiB", b / kMiB);
  if (b >= kKiB) return fmt::format("{:.2f} KiB", b / kKiB);
  return fmt::format("{} B", bytes);
}

std::string escape_for_display(std::string_view s) {
  std::string out;
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<uint8_t>(s[i]);
    if (c == '\n') {
      out += "\\n", ++i;
    } else if (c == '\t') {
      out += "\\t", ++i;
    } else if (c == '\r') {
      out += "\\r", ++i;
    } else if (c == '\\') {
      out += "\\\\", ++i;
    } else if (c < 0x20 || c == 0x7F) {
      out += fmt::format("\\x{:02X}", c), ++i;
    } else if (c < 0x80) {
      out += static_cast<char>(c), ++i;
    } else {
      // Keep a complete, valid multi-byte sequence; escape a stray byte (a byte-fallback token
      // holds one byte of a longer character).
      const size_t n = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
      const std::string_view seq = s.substr(i, n);
      if (n > 1 && seq.size() == n && !find_invalid_utf8(seq)) {
        out += seq, i += n;
      } else {
        out += fmt::format("\\x{:02X}", c), ++i;
      }
    }
  }
  return out;
}

}  // namespace gemma3::cli
