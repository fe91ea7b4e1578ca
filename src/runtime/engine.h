// The Engine (include/gemma3/engine.h) over a loaded model's internals.
#pragma once

#include <memory>
#include <mutex>

#include "backend/backend.h"
#include "gemma3/engine.h"
#include "model/config.h"
#include "model/forward.h"

namespace gemma3 {

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
};

Result<std::unique_ptr<Engine>> make_engine(EngineHost host, const EngineOptions& options);

}  // namespace gemma3
