// Helpers every test file may use: where the test models are, and reproducible random data.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <span>
#include <string>
#include <vector>

namespace gemma3::testutil {

// The default 270M GGUF: $GEMMA3_MODEL_270M when set (scripts/test.sh sets it), else where
// models/fetch.sh puts it. Tests that need it skip with a message when the file is missing.
inline std::string model_270m_path() {
  if (const char* env = std::getenv("GEMMA3_MODEL_270M"); env && *env) return env;
  const char* home = std::getenv("HOME");
  return std::string(home ? home : "") + "/.cache/gemma3/gemma-3-270m-q4_k_m.gguf";
}

// tests/data/<name> of the source tree ($GEMMA3_SOURCE_DIR when set: tools/gpu-check.sh runs
// prebuilt test binaries in another copy of the tree).
inline std::string data_path(const std::string& name) {
  const char* root = std::getenv("GEMMA3_SOURCE_DIR");
  return std::string(root && *root ? root : GEMMA3_SOURCE_DIR) + "/tests/data/" + name;
}

// n values of N(0, scale^2), the same for the same seed.
inline std::vector<float> randn(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = d(g);
  return v;
}

// A copy of a span (Session::last_logits/all_logits view the session's buffer).
inline std::vector<float> to_vector(std::span<const float> s) { return {s.begin(), s.end()}; }

// The tiny vocabulary of the tokenizer and chat-template tests: 17 hand-written pieces, then
// the 256 byte pieces <0x00>..<0xFF> (ids 17..272) that SentencePiece requires whenever
// byte_fallback is on. Types as a GGUF converter writes them: <unk> CONTROL (repaired to
// UNKNOWN on load). For Tokenizer::from_vocab(pieces, scores, types).
constexpr int32_t kTinyByte0 = 17;  // id of <0x00>
struct TinyVocab {
  std::vector<std::string> pieces = {"<pad>",
                                     "<eos>",
                                     "<bos>",
                                     "<unk>",
                                     "<start_of_turn>",
                                     "<end_of_turn>",
                                     "\n",
                                     "\xE2\x96\x81",
                                     "h",
                                     "e",
                                     "l",
                                     "o",
                                     "he",
                                     "ll",
                                     "hell",
                                     "hello",
                                     "\xE2\x96\x81hello"};
  // Merge scores: higher merges first (he, ll, hell, hello, ▁hello).
  std::vector<float> scores = {0, 0, 0, 0, 0, 0, 0, -10, -11, -12, -13, -14, -1, -2, -3, -4, -5};
  std::vector<int32_t> types = {3, 3, 3, 3, 3, 3, 4, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
  TinyVocab() {
    for (int b = 0; b < 256; ++b) {
      char piece[8];
      std::snprintf(piece, sizeof piece, "<0x%02X>", b);
      pieces.push_back(piece);
      scores.push_back(0);
      types.push_back(6);
    }
  }
};

}  // namespace gemma3::testutil
