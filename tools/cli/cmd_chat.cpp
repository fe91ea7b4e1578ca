// gemma3 chat: a multi-turn conversation in one Session, so every turn reuses the KV cache of
// the turns before it and only the new user message is prefilled.
//
// Input is read line by line from stdin, from a terminal or a pipe. Each non-empty line is one
// user turn. Commands: /clear (forget the conversation), /exit or /quit (or end of input),
// /image PATH (attach an image to the next message; repeatable).
// The "> " prompt is printed only when stdin is a terminal, so piped output holds just the
// replies, one per line.
#include <fmt/format.h>
#include <unistd.h>

#include <cstdio>
#include <iostream>
#include <optional>
#include <string>

#include "cli_common.h"
#include "commands.h"
#include "gemma3/util.h"

namespace gemma3::cli {

namespace {

std::string trim(const std::string& s) {
  const char* ws = " \t\r\n\f\v";
  const size_t b = s.find_first_not_of(ws);
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(ws) - b + 1);
}

}  // namespace

int cmd_chat(int argc, char** argv) {
  ModelFlags model_flags;
  SamplingFlags sampling;
  sampling.n_predict = -1;  // a chat reply ends at <end_of_turn>, not after a fixed count

  ArgParser p("chat", "-m MODEL [options]",
              "Interactive chat with the Gemma 3 chat template. Reads one user message per line from\n"
              "stdin (a terminal or a pipe) and streams each reply to stdout. /clear forgets the\n"
              "conversation; /image PATH attaches an image to the next message (multimodal model or\n"
              "--mmproj); /exit, /quit or end of input quits. Ctrl-C stops the current reply;\n"
              "a second Ctrl-C exits.");
  model_flags.add_to(p);
  sampling.add_to(p);
  std::string overflow = "error";
  p.add_choice("--context-overflow", {"error", "truncate"}, &overflow,
               "when the conversation outgrows --ctx: error (default), or truncate: drop the oldest\n"
               "turns (the system message stays) and prefill the rest again");
  if (Status s = p.parse(argc, argv, 2); !s.ok()) return fail("chat", kExitUsage, s.message());
  if (p.help_requested()) {
    std::fputs(p.help_text().c_str(), stdout);
    return kExitOk;
  }
  if (Status s = model_flags.check(); !s.ok()) return fail("chat", kExitUsage, s.message());
  if (Status s = sampling.check(p); !s.ok()) return fail("chat", kExitUsage, s.message());
  if (Status s = check_system_text(sampling.system); !s.ok()) return fail("chat", s);

  const bool terminal = ::isatty(STDIN_FILENO) != 0;
  install_interrupt_handler();
  auto loaded = load_model(model_flags);
  if (!loaded.ok()) return fail("chat", loaded.status());
  std::shared_ptr<Model> model = loaded->model;
  if (terminal || model_flags.verbose) std::fprintf(stderr, "loaded in %.3f s\n", loaded->load_seconds);
  if (model->is_base_model())
    std::fprintf(stderr,
                 "note: %s is a base (pre-trained) model: it completes text, and its chat replies may not "
                 "follow the conversation (an instruction-tuned \"-it\" checkpoint is made for chat)\n",
                 model_flags.model.c_str());

  auto session_or = model->new_session();
  if (!session_or.ok()) return fail("chat", session_or.status());
  std::unique_ptr<Session> session = std::move(session_or).value();

  if (terminal) {
    std::fprintf(stderr, "chat with %s. /clear resets, /exit quits.\n", model->description().c_str());
  }

  // Piped input stops at the first error (a script wants the failure); at a terminal the
  // error is shown and the conversation goes on.
  auto turn_error = [&](const Status& s) -> std::optional<int> {
    if (s.code() == ErrorCode::kOutOfRange) {
      fail("chat", kExitResource,
           fmt::format("{} (the conversation no longer fits the context of {} tokens; it has been cleared)",
                       s.to_string(), model->context_length()));
      session->clear();
    } else {
      fail("chat", s);
    }
    if (!terminal) return exit_code_for(s.code());
    return std::nullopt;
  };

  // The conversation so far (truncate mode re-renders it after dropping old turns). The reply
  // tokens reserved when fitting it: -n, or a quarter of the context for open-ended replies.
  const bool truncate = overflow == "truncate";
  std::vector<ChatMessage> history;
  const int reserve = sampling.n_predict > 0 ? std::min(sampling.n_predict, model->context_length() / 2)
                                             : model->context_length() / 4;

  std::vector<std::string> images;  // /image paths for the next user message
  const uint64_t line_limit = prompt_limit_bytes(*model);
  std::string line;
  while (true) {
    if (terminal) {
      std::fputs("> ", stdout);
      std::fflush(stdout);
    }
    interrupt_flag().store(false);
    bool too_long = false;
    if (!read_line_limited(std::cin, line, line_limit, &too_long)) break;
    if (too_long) {
      // Nothing this long fits the context: refuse it without tokenizing it.
      const int code = fail(
          "chat", out_of_range(fmt::format("an input line is longer than {} bytes, more than a context of {} "
                                           "tokens can hold; raise --ctx or shorten it",
                                           line_limit, model->context_length())));
      if (!terminal) return code;
      while (std::cin && std::cin.get() != '\n') {
      }
      continue;
    }
    // A Ctrl-C while waiting for input only arms the flag (a second one exits); it must not
    // cancel the reply to the line that follows.
    interrupt_flag().store(false);
    const std::string message = trim(line);
    if (message.empty()) continue;
    if (message == "/exit" || message == "/quit") break;
    if (message.rfind("/image ", 0) == 0) {
      images.push_back(trim(message.substr(7)));
      if (terminal) std::fprintf(stderr, "(image %s goes with the next message)\n", images.back().c_str());
      continue;
    }
    if (message == "/clear") {
      session->clear();
      history.clear();
      images.clear();
      if (terminal) std::fprintf(stderr, "(conversation cleared)\n");
      continue;
    }
    if (const auto bad = find_invalid_utf8(message)) {
      const int code =
          fail("chat", kExitBadInput, fmt::format("input line is not valid UTF-8 (byte offset {})", *bad));
      if (!terminal) return code;
      continue;
    }

    Stats before = session->stats();  // cumulative since the session was (re)started
    std::vector<ChatMessage> messages;
    // The system message belongs to the first user turn of a conversation (the template
    // prepends it to that turn's text), so it is sent again after /clear.
    if (session->position() == 0 && !sampling.system.empty()) messages.push_back({"system", sampling.system});
    messages.push_back({"user", message, std::move(images)});
    images.clear();
    if (history.empty())
      history = messages;
    else
      history.push_back(messages.back());
    Status fed = session->feed_chat(messages);
    if (truncate && (fed.code() == ErrorCode::kOutOfRange ||
                     (fed.ok() && model->context_length() - session->position() < reserve))) {
      auto dropped = session->feed_chat_truncating(history, reserve);
      fed = dropped.status();
      before = {};  // the session was cleared and refilled: this turn's stats start at 0
      if (dropped.ok() && (terminal || model_flags.verbose))
        std::fprintf(stderr, "(context full: dropped the %d oldest messages)\n", *dropped);
    }
    if (!fed.ok()) {
      history.clear();
      if (auto code = turn_error(fed)) return *code;
      continue;
    }

    const GenerateOptions options = sampling.generate_options(&interrupt_flag());
    std::string reply;
    Result<GenerateResult> gen = session->generate(options, [&reply](const TokenEvent& e) {
      reply += e.text;
      std::fwrite(e.text.data(), 1, e.text.size(), stdout);
      std::fflush(stdout);
      return true;
    });
    history.push_back({"model", reply});
    std::fputc('\n', stdout);
    std::fflush(stdout);
    if (interrupt_flag().load() || (gen.ok() && gen->finish == FinishReason::kCancelled)) {
      std::fprintf(stderr, "(reply interrupted)\n");
      continue;
    }
    if (!gen.ok() || gen->finish == FinishReason::kContextFull) {
      history.clear();
      const Status error =
          gen.ok() ? out_of_range(fmt::format("the context of {} tokens is full", model->context_length()))
                   : gen.status();
      if (auto code = turn_error(error)) return *code;
      continue;
    }
    if (model_flags.verbose) {
      const Stats& after = session->stats();
      Stats turn;
      turn.prompt_tokens = after.prompt_tokens - before.prompt_tokens;
      turn.prefill_seconds = after.prefill_seconds - before.prefill_seconds;
      turn.generated_tokens = after.generated_tokens - before.generated_tokens;
      turn.decode_seconds = after.decode_seconds - before.decode_seconds;
      turn.images = after.images - before.images;
      turn.images_encoded = after.images_encoded - before.images_encoded;
      turn.image_encode_seconds = after.image_encode_seconds - before.image_encode_seconds;
      print_session_stats(turn);
      std::fprintf(stderr, "context: %d / %d tokens\n", session->position(), model->context_length());
    }
  }
  if (terminal) std::fputc('\n', stdout);
  return kExitOk;
}

}  // namespace gemma3::cli
