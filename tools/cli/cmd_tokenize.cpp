// gemma3 tokenize: the ids of a text under the checkpoint's tokenizer, without <bos>.
// Only the checkpoint's metadata is read (no backend, no KV cache), so it is fast.
//
//   gemma3 tokenize -m M -p "Hello world"        9259 -> 'Hello'
//                                                 1902 -> ' world'
//   gemma3 tokenize -m M -p "Hello world" --ids  9259 1902
//   gemma3 tokenize -m M -f wiki.txt --stats     ids, bytes, seconds, MB/s and peak memory of
//                                                 the encode (tools/bench/tokenizer_bench.py)
#include <fmt/format.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <string>
#include <string_view>

#include "cli_common.h"
#include "commands.h"

namespace gemma3::cli {
namespace {

// A field of /proc/self/status in kB ("VmRSS", "VmHWM"), or -1.
long proc_status_kb(std::string_view field) {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.size() > field.size() && line.compare(0, field.size(), field) == 0 && line[field.size()] == ':')
      return std::strtol(line.c_str() + field.size() + 1, nullptr, 10);
  }
  return -1;
}

}  // namespace

int cmd_tokenize(int argc, char** argv) {
  std::string model_path, prompt, file, export_path;
  bool ids_only = false, parse_special = false, stats = false, ref = false;
  ArgParser p("tokenize",
              "-m MODEL (-p TEXT | -f FILE) [--ids | --stats] [--parse-special] [--ref]\n"
              "       -m MODEL --export-model PATH",
              "Prints one `id -> 'piece'` line per token (the piece as the bytes it decodes to, with\n"
              "control characters escaped; control tokens as their name), or with --ids only the ids on\n"
              "one line. No <bos> is added.");
  p.add_option("-m,--model", "PATH", &model_path, "model: a .gguf file or a Hugging Face folder (required)");
  p.add_option("-p,--prompt", "TEXT", &prompt, "text to tokenize (taken literally)");
  p.add_option("-f,--file", "FILE", &file, "read the text from FILE");
  p.add_flag("--ids", &ids_only, "print only the ids, space-separated, on one line");
  p.add_flag("--parse-special", &parse_special,
             "turn control-token text such as <end_of_turn> into its id (default: plain text)");
  p.add_flag("--stats", &stats,
             "print only the encode's ids, bytes, seconds, MB/s and peak memory (a measurement)");
  p.add_flag("--ref", &ref,
             "encode with the SentencePiece library (the reference; same ids, much slower on long texts)");
  p.add_option("--export-model", "PATH", &export_path,
               "write the SentencePiece model (tokenizer.model bytes) the tokenizer runs, and exit");
  if (Status s = p.parse(argc, argv, 2); !s.ok()) return fail("tokenize", kExitUsage, s.message());
  if (p.help_requested()) {
    std::fputs(p.help_text().c_str(), stdout);
    return kExitOk;
  }
  if (model_path.empty()) return fail("tokenize", kExitUsage, "-m MODEL is required");
  if (!export_path.empty()) {
    auto tokenizer = Tokenizer::from_checkpoint(model_path);
    if (!tokenizer.ok()) return fail("tokenize", tokenizer.status());
    const std::string bytes = tokenizer->sentencepiece_model_proto();
    std::ofstream out(export_path, std::ios::binary);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!out.flush()) return fail("tokenize", kExitBadInput, fmt::format("cannot write {}", export_path));
    return kExitOk;
  }
  if (ids_only && stats) return fail("tokenize", kExitUsage, "--ids and --stats exclude each other");
  if (prompt.empty() && file.empty() && !p.given("-p") && !p.given("--prompt"))
    return fail("tokenize", kExitUsage, "a text is required: -p TEXT or -f FILE");
  auto text = read_prompt(prompt, file, "text", kMaxTextFileBytes);
  if (!text.ok()) return fail("tokenize", text.status());

  auto tokenizer = Tokenizer::from_checkpoint(model_path);
  if (!tokenizer.ok()) return fail("tokenize", tokenizer.status());
  const Tokenizer& tok = *tokenizer;
  auto cpu_now = [] {
    timespec ts{};
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
  };
  // The encode's own peak memory: the kernel's high-water mark (VmHWM) is reset to the current
  // RSS ("5" > /proc/self/clear_refs, Linux >= 4.0) so that loading the model does not hide it.
  long rss_before_kb = -1;
  if (stats && std::ofstream("/proc/self/clear_refs") << "5") rss_before_kb = proc_status_kb("VmRSS");
  const auto start = std::chrono::steady_clock::now();
  const double cpu_start = cpu_now();
  auto ids = ref ? tok.encode_ref(*text, parse_special) : tok.encode(*text, parse_special);
  const double cpu_seconds = cpu_now() - cpu_start;
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (!ids.ok()) return fail("tokenize", ids.status());
  if (stats) {
    // MB/s from the CPU time: on a shared machine the wall clock also counts other processes.
    // peak_extra_kb: the most memory the encode held at once beyond what was resident before
    // it (the text was already read), ids included; -1 when it cannot be measured.
    const long peak_kb = rss_before_kb < 0 ? -1 : proc_status_kb("VmHWM");
    std::printf("ids %zu bytes %zu seconds %.6f cpu_seconds %.6f MB/s %.3f peak_extra_kb %ld encoder %s\n",
                ids->size(), text->size(), seconds, cpu_seconds,
                cpu_seconds > 0 ? static_cast<double>(text->size()) / 1e6 / cpu_seconds : 0.0,
                peak_kb < 0 ? -1L : peak_kb - rss_before_kb,
                ref || !tok.encode_fallback_reason().empty() ? "sentencepiece" : "built-in");
    return kExitOk;
  }

  std::string out;
  if (ids_only) {
    for (size_t i = 0; i < ids->size(); ++i) out += fmt::format("{}{}", i ? " " : "", (*ids)[i]);
    out += '\n';
  } else {
    for (int32_t id : *ids) {
      const std::string shown = tok.type(id) == PieceType::kControl ? std::string(tok.piece(id))
                                                                    : escape_for_display(tok.decode(id));
      out += fmt::format("{:6} -> '{}'\n", id, shown);
    }
  }
  std::fwrite(out.data(), 1, out.size(), stdout);
  return kExitOk;
}

}  // namespace gemma3::cli
