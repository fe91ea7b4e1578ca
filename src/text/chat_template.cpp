#include "text/chat_template.h"

#include <fmt/format.h>

#include <algorithm>
#include <optional>
#include <string>
#include <string_view>

#include "gemma3/util.h"

namespace gemma3 {
namespace {

// Python's str.isspace() set, which Jinja's `trim` filter (str.strip) removes.
bool is_python_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20) || cp == 0x85 || cp == 0xA0 ||
         cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}

// Code point of the UTF-8 sequence s[pos, pos+len), or 0xFFFFFFFF when it is not well formed
// (then it is not whitespace and the tokenizer reports the bad byte).
uint32_t decode_cp(std::string_view s, size_t pos, size_t len) {
  const uint8_t c = static_cast<uint8_t>(s[pos]);
  if (len == 1) return c < 0x80 ? c : 0xFFFFFFFFu;
  uint32_t cp = c & (0x7F >> len);
  for (size_t k = 1; k < len; ++k) {
    const uint8_t cc = static_cast<uint8_t>(s[pos + k]);
    if ((cc & 0xC0) != 0x80) return 0xFFFFFFFFu;
    cp = (cp << 6) | (cc & 0x3F);
  }
  return cp;
}

size_t utf8_len(uint8_t lead) {
  return lead < 0x80 ? 1 : lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
}

std::string_view trim(std::string_view s) {
  size_t begin = 0, end = s.size();
  while (begin < end) {
    const size_t len = utf8_len(static_cast<uint8_t>(s[begin]));
    if (begin + len > end || !is_python_space(decode_cp(s, begin, len))) break;
    begin += len;
  }
  while (end > begin) {
    size_t start = end - 1;  // back up to the lead byte of the last code point (at most 3 steps)
    while (start > begin && end - start < 4 && (static_cast<uint8_t>(s[start]) & 0xC0) == 0x80) --start;
    const size_t len = end - start;
    if (utf8_len(static_cast<uint8_t>(s[start])) != len || !is_python_space(decode_cp(s, start, len))) break;
    end = start;
  }
  return s.substr(begin, end - begin);
}

// A model reply as the library streamed it may end inside a UTF-8 character (a reply cut by
// -n, or a token that is one byte of an emoji), which the tokenizer refuses. Well-formed runs
// are encoded as usual and every other byte becomes its byte-fallback piece "<0xNN>", which is
// how the model produced such bytes in the first place.
Result<std::vector<int32_t>> encode_model_text(const Tokenizer& tokenizer, std::string_view text) {
  std::vector<int32_t> ids;
  while (!text.empty()) {
    const size_t bad = find_invalid_utf8(text);
    if (bad > 0) {
      GEMMA3_ASSIGN_OR_RETURN(
          std::vector<int32_t> run,
          tokenizer.encode(text.substr(0, std::min(bad, text.size())), /*parse_special=*/false));
      ids.insert(ids.end(), run.begin(), run.end());
    }
    if (bad == std::string_view::npos) break;
    const auto byte = static_cast<uint8_t>(text[bad]);
    const std::optional<int32_t> id = tokenizer.find(fmt::format("<0x{:02X}>", byte));
    if (!id)
      return invalid_file(fmt::format(
          "byte 0x{:02X} at offset {} is not valid UTF-8 and the vocabulary has no byte piece for it", byte,
          bad));
    ids.push_back(*id);
    text.remove_prefix(bad + 1);
  }
  return ids;
}

}  // namespace

Result<std::vector<int32_t>> render_chat(const Tokenizer& tokenizer, const std::vector<ChatMessage>& messages,
                                         bool add_bos, bool add_generation_prompt,
                                         std::vector<size_t>* image_slots) {
  const int32_t sot = tokenizer.start_of_turn_id(), eot = tokenizer.end_of_turn_id();
  if (sot < 0 || eot < 0) {
    return unsupported(
        "chat template: the vocabulary has no <start_of_turn>/<end_of_turn> pieces (not an "
        "instruction-tuned Gemma 3 tokenizer?)");
  }
  if (messages.empty()) return invalid_argument("chat template: no messages to render");

  // A leading system message has no turn of its own: it prefixes the first user message.
  size_t first = 0;
  std::string system_prefix;
  if (messages[0].role == "system") {
    if (!add_bos) {
      return invalid_argument(
          "chat template: a system message can only start a conversation (add_bos=true), not "
          "a continuation");
    }
    system_prefix = messages[0].content + "\n\n";  // the template does not trim it
    first = 1;
    if (messages.size() == 1)
      return invalid_argument("chat template: a system message needs a user message after it");
  }

  std::vector<int32_t> ids;
  if (add_bos) ids.push_back(tokenizer.bos_id());
  for (size_t i = first; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    const bool expect_user = (i - first) % 2 == 0;
    std::string_view role;
    if (m.role == "user") {
      role = "user";
    } else if (m.role == "model" || m.role == "assistant") {
      role = "model";
    } else if (m.role == "system") {
      return invalid_argument(
          fmt::format("chat template: message {} is a system message; only the first message "
                      "may be one",
                      i));
    } else {
      return invalid_argument(fmt::format(
          "chat template: message {} has role {:?}; expected user, model, assistant or system", i, m.role));
    }
    if ((role == "user") != expect_user) {
      return invalid_argument(
          fmt::format("chat template: message {} has role {:?} but roles must alternate "
                      "user/model starting with user (expected {})",
                      i, m.role, expect_user ? "user" : "model or assistant"));
    }
    // "<start_of_turn>" ids, then "{role}\n{system\n\n if first}{content}" as text, "<end_of_turn>", "\n".
    std::string text = fmt::format("{}\n{}{}", role, i == first ? system_prefix : "", trim(m.content));
    ids.push_back(sot);
    // The text split at the image slots: segments[0] slot segments[1] slot ... (one segment
    // when there are no images).
    std::vector<std::string_view> segments;
    const size_t n_images = m.images.size() + m.image_bytes.size();  // files, then bytes (gemma3.h)
    if (n_images == 0) {
      segments.push_back(text);
    } else {
      if (role != "user")
        return invalid_argument(
            fmt::format("chat template: message {} ({}) has images; only user messages can", i, m.role));
      if (!image_slots)
        return invalid_argument(fmt::format("chat template: message {} has images, which need a session", i));
      static constexpr std::string_view kMarker = "<start_of_image>";
      const std::string_view all = text;
      // "user\n" and the system prefix come before images that precede the text.
      const size_t head = role.size() + 1 + (i == first ? system_prefix.size() : 0);
      size_t markers = 0;
      for (size_t at = all.find(kMarker); at != std::string_view::npos; at = all.find(kMarker, at + 1))
        ++markers;
      if (markers == 0) {
        segments.push_back(all.substr(0, head));
        for (size_t k = 1; k < n_images; ++k) segments.push_back({});
        segments.push_back(all.substr(head));
      } else if (markers != n_images) {
        return invalid_argument(
            fmt::format("chat template: message {} has {} \"<start_of_image>\" markers but {} "
                        "images",
                        i, markers, n_images));
      } else {
        size_t from = 0;
        for (size_t at = all.find(kMarker); at != std::string_view::npos; at = all.find(kMarker, from)) {
          segments.push_back(all.substr(from, at - from));
          from = at + kMarker.size();
        }
        segments.push_back(all.substr(from));
      }
    }
    for (size_t k = 0; k < segments.size(); ++k) {
      if (k > 0) image_slots->push_back(ids.size());
      if (segments[k].empty()) continue;
      auto body = role == "model" ? encode_model_text(tokenizer, segments[k])
                                  : tokenizer.encode(std::string(segments[k]), /*parse_special=*/false);
      if (!body.ok()) return body.status().with_context(fmt::format("chat template: message {}", i));
      ids.insert(ids.end(), body->begin(), body->end());
    }
    ids.push_back(eot);
    GEMMA3_ASSIGN_OR_RETURN(std::vector<int32_t> nl, tokenizer.encode("\n"));
    ids.insert(ids.end(), nl.begin(), nl.end());
  }
  if (add_generation_prompt) {
    ids.push_back(sot);
    GEMMA3_ASSIGN_OR_RETURN(std::vector<int32_t> prompt, tokenizer.encode("model\n"));
    ids.insert(ids.end(), prompt.begin(), prompt.end());
  }
  return ids;
}

}  // namespace gemma3
