// gemma3 run: one prompt in, one streamed reply out.
//
// stdout carries only the generated text (streamed token by token, then a newline), so the
// output can be piped; load time and prefill/decode speed go to stderr.
#include <fmt/format.h>

#include <cstdio>

#include "cli_common.h"
#include "commands.h"

namespace gemma3::cli {

namespace {

// "prompt: 12 tokens in 0.05 s (240.0 tok/s)"
void print_stats(const char* what, int tokens, double seconds) {
  const double rate = seconds > 0 ? tokens / seconds : 0.0;
  std::fprintf(stderr, "%-10s %d tokens in %.3f s (%.1f tok/s)\n", what, tokens, seconds, rate);
}

// --prompt-cache: feeds the prompt's ids, restoring a saved state first when its tokens are a
// prefix of them (then only the rest is prefilled), and saves the state after the prompt.
Status feed_with_prompt_cache(Session& session, const std::string& cache_file,
                              const std::vector<int32_t>& ids) {
  auto use = session.feed_tokens_with_state_file(ids, cache_file);
  if (!use.ok()) return use.status();
  if (!use->not_reused.empty())
    std::fprintf(stderr, "prompt cache: not reused (%s)\n", cli_terms(use->not_reused).c_str());
  if (use->restored == ids.size() && use->restored > 0)
    std::fprintf(stderr, "prompt cache: all %zu prompt tokens restored from %s\n", use->restored,
                 cache_file.c_str());
  else if (use->restored > 0)
    std::fprintf(stderr, "prompt cache: %zu of %zu prompt tokens restored from %s\n", use->restored,
                 ids.size(), cache_file.c_str());
  return ok_status();
}

}  // namespace

void print_session_stats(const Stats& s) {
  print_stats("prompt:", s.prompt_tokens, s.prefill_seconds);
  print_stats("generated:", s.generated_tokens, s.decode_seconds);
  if (s.images > 0)
    std::fprintf(stderr, "images:    %d (%d encoded) in %.3f s\n", s.images, s.images_encoded,
                 s.image_encode_seconds);
}

int cmd_run(int argc, char** argv) {
  ModelFlags model_flags;
  SamplingFlags sampling;
  std::string prompt, file;
  std::vector<std::string> images;
  bool raw = false;
  std::string prompt_cache;

  ArgParser p("run", "-m MODEL (-p PROMPT | -f FILE) [options]",
              "Generates a reply to one prompt and streams it to stdout. The prompt is wrapped in the\n"
              "Gemma 3 chat template (with --system as the system message) unless --raw is given, in\n"
              "which case it is fed as <bos> + text. A checkpoint that says it is a base (pre-trained)\n"
              "model is completed as raw text unless --chat-template or --system is given. Statistics go\n"
              "to stderr. Ctrl-C stops generation.");
  model_flags.add_to(p);
  p.add_option("-p,--prompt", "TEXT", &prompt, "prompt text (taken literally)");
  p.add_option("-f,--file", "FILE", &file, "read the prompt from FILE");
  bool chat_template = false;
  p.add_flag("--raw", &raw, "no chat template: feed <bos> + the prompt as plain text");
  p.add_flag("--chat-template", &chat_template, "use the chat template even for a base (pre-trained) model");
  p.add_option("--prompt-cache", "FILE", &prompt_cache,
               "reuse the prefilled prompt saved in FILE when it is a prefix of this prompt (same\n"
               "model, --ctx, --kv-type, --chunk), prefill only the rest, and save the state to FILE");
  p.add_list("--image", "PATH", &images,
             "an image for the prompt (repeatable); placed at each \"<start_of_image>\" in the prompt,\n"
             "or before the text. Needs a multimodal model or --mmproj");
  sampling.add_to(p);

  if (Status s = p.parse(argc, argv, 2); !s.ok()) return fail("run", kExitUsage, s.message());
  if (p.help_requested()) {
    std::fputs(p.help_text().c_str(), stdout);
    return kExitOk;
  }
  if (Status s = model_flags.check(); !s.ok()) return fail("run", kExitUsage, s.message());
  if (Status s = sampling.check(p); !s.ok()) return fail("run", kExitUsage, s.message());
  if (!prompt_cache.empty() && p.given("--image"))
    return fail("run", kExitUsage, "--prompt-cache is for text prompts; drop --image");
  if (raw && p.given("--system"))
    return fail("run", kExitUsage, "--system needs the chat template; drop --raw");
  if (raw && chat_template) return fail("run", kExitUsage, "--raw and --chat-template contradict each other");
  if (prompt.empty() && file.empty() && !p.given("-p") && !p.given("--prompt"))
    return fail("run", kExitUsage, "a prompt is required: -p TEXT or -f FILE");
  auto text = read_prompt(prompt, file, "prompt", kMaxPromptBytes);
  if (!text.ok()) return fail("run", text.status());
  if (Status s = check_system_text(sampling.system); !s.ok()) return fail("run", s);

  install_interrupt_handler();
  auto loaded = load_model(model_flags);
  if (!loaded.ok()) return fail("run", loaded.status());
  std::shared_ptr<Model> model = loaded->model;
  std::fprintf(stderr, "load:       %.3f s\n", loaded->load_seconds);
  if (model_flags.verbose) {
    std::fprintf(
        stderr, "sampling:   temp %g, top-k %d, top-p %g, min-p %g, repeat-penalty %g (last %d), seed %llu\n",
        sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p, sampling.repeat_penalty,
        sampling.repeat_last_n, static_cast<unsigned long long>(sampling.seed));
  }

  if (model->is_base_model() && !raw && !chat_template && !p.given("--system")) {
    // A pre-trained model answers the chat template poorly; it completes text well.
    raw = true;
    std::fprintf(stderr,
                 "note:       %s is a base (pre-trained) model: completing the prompt as raw text "
                 "(--chat-template to use the chat template anyway)\n",
                 model_flags.model.c_str());
  }
  if (Status s = check_prompt_fits(*model, "prompt", text->size() + sampling.system.size()); !s.ok())
    return fail("run", s);
  auto session_or = model->new_session();
  if (!session_or.ok()) return fail("run", session_or.status());
  std::unique_ptr<Session> session = std::move(session_or).value();

  Status fed;
  if (!prompt_cache.empty()) {
    // The prompt's ids exactly as feed_text / feed_chat would make them.
    Result<std::vector<int32_t>> ids = std::vector<int32_t>{};
    if (raw) {
      ids = model->tokenizer().encode(*text);
      if (ids.ok()) ids->insert(ids->begin(), model->tokenizer().bos_id());
    } else {
      std::vector<ChatMessage> messages;
      if (!sampling.system.empty()) messages.push_back({"system", sampling.system});
      messages.push_back({"user", *text});
      ids = render_chat(model->tokenizer(), messages, /*add_bos=*/true, /*add_generation_prompt=*/true);
    }
    fed = ids.ok() ? feed_with_prompt_cache(*session, prompt_cache, *ids) : ids.status();
  } else if (raw) {
    for (const std::string& image : images)  // images first, then the text
      if (fed.ok()) fed = session->feed_image(image);
    if (fed.ok()) fed = session->feed_text(*text);
  } else {
    std::vector<ChatMessage> messages;
    if (!sampling.system.empty()) messages.push_back({"system", sampling.system});
    messages.push_back({"user", *text, images});
    fed = session->feed_chat(messages);
  }
  if (!fed.ok()) {
    return fail("run", fed);  // out of range: the library names the token counts and --ctx
  }
  if (interrupt_flag().load()) {
    std::fprintf(stderr, "interrupted during prefill\n");
    return kExitInterrupted;
  }

  const GenerateOptions options = sampling.generate_options(&interrupt_flag());
  Result<GenerateResult> gen = session->generate(options, [](const TokenEvent& e) {
    std::fwrite(e.text.data(), 1, e.text.size(), stdout);
    std::fflush(stdout);
    return true;
  });
  std::fputc('\n', stdout);
  std::fflush(stdout);

  const bool interrupted = interrupt_flag().load() || (gen.ok() && gen->finish == FinishReason::kCancelled);
  print_session_stats(session->stats());
  if (gen.ok()) std::fprintf(stderr, "stopped:   %s\n", finish_reason_name(gen->finish));
  if (interrupted) {
    std::fprintf(stderr, "interrupted\n");
    return kExitInterrupted;
  }
  if (!gen.ok()) return fail("run", gen.status());
  if (gen->finish == FinishReason::kContextFull) {
    return fail("run", kExitResource,
                fmt::format("out of range: the context of {} tokens is full; raise --ctx or lower -n",
                            model->context_length()));
  }
  return kExitOk;
}

}  // namespace gemma3::cli
