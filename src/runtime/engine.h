// The Engine (include/gemma3/engine.h) over a loaded model's internals.
#pragma once

#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "gemma3/engine.h"
#include "model/config.h"
#include "model/forward.h"

namespace gemma3 {

// One image block of a prompt: the soft tokens ids[offset, offset + n), whose input rows are
// `embeddings` [n, H] (the vision tower's output), prefilled as one chunk with a bidirectional
// group (docs/vision.md).
struct PromptImage {
  size_t offset = 0;
  size_t n = 0;
  std::shared_ptr<const std::vector<float>> embeddings;
  // The image's identity: its content hash and size, and which Pan & Scan slot. Prefix reuse
  // compares it, since every soft token has the same id (docs/batching.md, "Images").
  std::string key;
};

// A chat prompt with its image blocks (in order of offset).
struct ImagePrompt {
  std::vector<int32_t> ids;
  std::vector<PromptImage> images;
};

// What an engine uses of a loaded model. `owner` keeps the rest alive.
struct EngineHost {
  std::shared_ptr<Model> owner;
  const ModelConfig* config = nullptr;
  const BackendModel* weights = nullptr;
  Backend* backend = nullptr;
  std::mutex* backend_mutex = nullptr;  // held around every use of the backend (ModelImpl)
  const Tokenizer* tokenizer = nullptr;
  int n_text_ids = 0;  // ids generate may produce
  int context = 0;     // the model's context (LoadOptions::context)
  int prefill_chunk = 0;
  DType kv_dtype = DType::kBF16;
  // Renders chat messages that have images, with <bos> and the generation prompt, as
  // Session::feed_chat does on an empty session: decodes and encodes the images (the vision
  // tower, under backend_mutex) on the calling thread, with a cache of encoded images shared by
  // every caller. May be called from several threads at once. Errors: no vision tower
  // (kUnsupported), an image that cannot be read or decoded or is over the limits.
  std::function<Result<ImagePrompt>(const std::vector<ChatMessage>&)> render_chat_images;
};

Result<std::unique_ptr<Engine>> make_engine(EngineHost host, const EngineOptions& options);

}  // namespace gemma3
