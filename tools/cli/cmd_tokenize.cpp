// gemma3 tokenize: the ids of a text under the checkpoint's tokenizer, without <bos>.
// Only the checkpoint's metadata is read (no backend, no KV cache), so it is fast.
//
//   gemma3 tokenize -m M -p "Hello world"        9259 -> 'Hello'
//                                                 1902 -> ' world'
//   gemma3 tokenize -m M -p "Hello world" --ids  9259 1902
#include <fmt/format.h>

#include <cstdio>

#include "cli_common.h"
#include "commands.h"
#include "model/weights.h"

namespace gemma3::cli {

int cmd_tokenize(int argc, char** argv) {
  std::string model_path, prompt, file;
  bool ids_only = false, parse_special = false;
  ArgParser p("tokenize", "-m MODEL (-p TEXT | -f FILE) [--ids] [--parse-special]",
              "Prints one `id -> 'piece'` line per token (the piece as the bytes it decodes to, with\n"
              "control characters escaped; control tokens as their name), or with --ids only the ids on\n"
              "one line. No <bos> is added.");
  p.add_option("-m,--model", "PATH", &model_path, "model: a .gguf file or a Hugging Face folder (required)");
  p.add_option("-p,--prompt", "TEXT", &prompt, "text to tokenize (taken literally)");
  p.add_option("-f,--file", "FILE", &file, "read the text from FILE");
  p.add_flag("--ids", &ids_only, "print only the ids, space-separated, on one line");
  p.add_flag("--parse-special", &parse_special,
             "turn control-token text such as <end_of_turn> into its id (default: plain text)");
  if (Status s = p.parse(argc, argv, 2); !s.ok()) return fail("tokenize", kExitUsage, s.message());
  if (p.help_requested()) {
    std::fputs(p.help_text().c_str(), stdout);
    return kExitOk;
  }
  if (model_path.empty()) return fail("tokenize", kExitUsage, "-m MODEL is required");
  if (prompt.empty() && file.empty() && !p.given("-p") && !p.given("--prompt"))
    return fail("tokenize", kExitUsage, "a text is required: -p TEXT or -f FILE");
  auto text = read_prompt(prompt, file, "text");
  if (!text.ok()) return fail("tokenize", text.status());

  auto checkpoint = Checkpoint::open(model_path);
  if (!checkpoint.ok()) return fail("tokenize", checkpoint.status());
  const Tokenizer& tok = (*checkpoint)->tokenizer();
  auto ids = tok.encode(*text, parse_special);
  if (!ids.ok()) return fail("tokenize", ids.status());

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
