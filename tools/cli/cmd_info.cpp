// gemma3 info: what a checkpoint is and what it will cost to run. Reads only metadata (no
// backend, no KV cache); the memory plan is plan_memory() itself (src/model/memory_plan.h), the
// function Model::load checks against the backend's free memory, with the same prefill chunk
// and KV type a session would use, so the numbers equal what `run` allocates at that context.
#include <fmt/format.h>

#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>

#include "cli_common.h"
#include "commands.h"
#include "core/dtype.h"
#include "model/kv_cache.h"
#include "model/memory_plan.h"
#include "model/weights.h"

namespace gemma3::cli {

namespace {

struct TypeTotal {
  int count = 0;
  uint64_t bytes = 0;
};

// "LLLLLGLLLLLG..." (L: local sliding-window layer, G: global layer)
std::string layer_pattern(const ModelConfig& c) {
  std::string s;
  for (int i = 0; i < c.n_layers; ++i) s += c.is_global(i) ? 'G' : 'L';
  return s;
}

}  // namespace

int cmd_info(int argc, char** argv) {
  std::string model_path, kv_type = "bf16", output = "text";
  int context = 0, chunk = 256;
  bool list_tensors = false;
  ArgParser p("info", "-m MODEL [--ctx N] [--kv-type bf16|f32|q8_0|fp8] [-o text|json]",
              "Architecture and config of a checkpoint, its tensor types, and the memory plan at a\n"
              "context length: weights, KV cache of the global layers, the local layers' rings, and the\n"
              "all-global cache a model without sliding windows would need.");
  p.add_option("-m,--model", "PATH", &model_path, "model: a .gguf file or a Hugging Face folder (required)");
  p.add_option("--ctx", "N", &context, "context for the memory plan (default: the model's max context)");
  p.add_choice("--kv-type", {"bf16", "f32", "q8_0", "fp8"}, &kv_type,
               "KV cache element type (default: bf16)");
  p.add_option("--chunk", "N", &chunk,
               "prefill chunk the plan assumes; local rings hold W+N-1 slots (default: 256)");
  p.add_choice("-o,--output", {"text", "json"}, &output, "output format (default: text)");
  p.add_flag("--tensors", &list_tensors, "also list every text-model tensor (name, type, shape, bytes)");
  if (Status s = p.parse(argc, argv, 2); !s.ok()) return fail("info", kExitUsage, s.message());
  if (p.help_requested()) {
    std::fputs(p.help_text().c_str(), stdout);
    return kExitOk;
  }
  if (model_path.empty()) return fail("info", kExitUsage, "-m MODEL is required");
  if (context < 0) return fail("info", kExitUsage, fmt::format("--ctx must be >= 1, got {}", context));
  if (chunk < 1) return fail("info", kExitUsage, fmt::format("--chunk must be >= 1, got {}", chunk));

  auto checkpoint_or = Checkpoint::open(model_path);
  if (!checkpoint_or.ok()) return fail("info", checkpoint_or.status());
  const Checkpoint& ckpt = **checkpoint_or;
  const ModelConfig& c = ckpt.config();
  if (context == 0) context = c.max_context;

  std::map<std::string, TypeTotal> by_type;  // dtype name -> count, bytes
  uint64_t tensor_bytes = 0;
  for (const TensorView* t : ckpt.text_tensors()) {
    TypeTotal& tt = by_type[dtype_name(t->dtype)];
    ++tt.count;
    tt.bytes += t->nbytes;
    tensor_bytes += t->nbytes;
  }
  const uint64_t weight_bytes = ckpt.weight_bytes();
  const KvType kv = *kv_type_from_name(kv_type);  // add_choice admits only known names
  if (Status s = check_kv_type(c, kv); !s.ok()) return fail("info", s);
  const MemoryPlan mplan = plan_memory(c, ckpt.weight_bytes(), context, chunk, kv_dtype(kv));
  const KvPlan& plan = mplan.kv;
  const int n_global = c.n_global_layers();
  const int n_local = c.n_layers - n_global;
  int local_slots = 0;  // ring slots of one local layer (all local layers have the same)
  for (int i = 0; i < c.n_layers; ++i)
    if (!c.is_global(i)) local_slots = plan.capacity[i];
  const double saving =
      plan.total_bytes() ? static_cast<double>(plan.all_global_bytes) / plan.total_bytes() : 0;

  if (output == "json") {
    nlohmann::json types = nlohmann::json::object();
    for (const auto& [name, tt] : by_type) types[name] = {{"count", tt.count}, {"bytes", tt.bytes}};
    nlohmann::json j = {
        {"path", ckpt.path()},
        {"format", ckpt.format()},
        {"size_label", c.size_label},
        {"n_layers", c.n_layers},
        {"n_global_layers", n_global},
        {"n_local_layers", n_local},
        {"hidden", c.hidden},
        {"intermediate", c.intermediate},
        {"n_heads", c.n_heads},
        {"n_kv_heads", c.n_kv_heads},
        {"head_dim", c.head_dim},
        {"sliding_window", c.sliding_window},
        {"layer_pattern", layer_pattern(c)},
        {"max_context", c.max_context},
        {"rope",
         {{"theta_local", c.rope_theta_local},
          {"theta_global", c.rope_theta_global},
          {"scale_global", c.rope_scale_global}}},
        {"query_pre_attn_scalar", c.query_pre_attn_scalar},
        {"attn_scale", c.attn_scale()},
        {"rms_norm_eps", c.rms_norm_eps},
        {"vocab_rows", c.vocab_size},
        {"tokenizer_size", ckpt.tokenizer().n_vocab()},
        {"bos_id", c.bos_id},
        {"eos_ids", c.eos_ids},
        {"has_vision", c.has_vision},
        {"tensors", {{"count", ckpt.text_tensors().size()}, {"bytes", tensor_bytes}, {"by_type", types}}},
        {"weight_bytes", weight_bytes},
        {"memory",
         {{"context", plan.context},
          {"chunk", plan.chunk},
          {"kv_type", kv_type},
          {"bytes_per_slot", plan.bytes_per_slot},
          {"global_slots", plan.context},
          {"local_slots", local_slots},
          {"weight_bytes", weight_bytes},
          {"kv_global_bytes", plan.global_bytes},
          {"kv_local_bytes", plan.local_bytes},
          {"kv_total_bytes", plan.total_bytes()},
          {"kv_all_global_bytes", plan.all_global_bytes},
          {"kv_saving", saving},
          {"scratch_bytes", mplan.scratch_bytes},
          {"total_bytes", mplan.total_bytes()}}},
    };
    if (list_tensors) {
      nlohmann::json list = nlohmann::json::array();
      for (const TensorView* t : ckpt.text_tensors())
        list.push_back(
            {{"name", t->name}, {"type", dtype_name(t->dtype)}, {"shape", t->shape}, {"bytes", t->nbytes}});
      j["tensor_list"] = list;
    }
    std::printf("%s\n", j.dump(2).c_str());
    return kExitOk;
  }

  std::string o;
  auto line = [&o](std::string_view key, const std::string& value) {
    o += fmt::format("{:<18}{}\n", key, value);
  };
  line("model", fmt::format("{} ({})", ckpt.path(), ckpt.format()));
  line("size", c.size_label + (c.has_vision ? " (text + vision)" : " (text)"));
  line("layers", fmt::format("{} ({} global, {} local)", c.n_layers, n_global, n_local));
  line("pattern", layer_pattern(c));
  line("hidden H", std::to_string(c.hidden));
  line("intermediate I", std::to_string(c.intermediate));
  line("heads", fmt::format("{} query, {} kv, head dim {}", c.n_heads, c.n_kv_heads, c.head_dim));
  line("sliding window", std::to_string(c.sliding_window));
  line("max context", std::to_string(c.max_context));
  line("rope", fmt::format("local theta {}, global theta {}, global linear scale {}", c.rope_theta_local,
                           c.rope_theta_global, c.rope_scale_global));
  line("attention scale",
       fmt::format("{:.7g} (query_pre_attn_scalar {:g})", c.attn_scale(), c.query_pre_attn_scalar));
  line("rms norm eps", fmt::format("{:g}", c.rms_norm_eps));
  line("vocab rows", std::to_string(c.vocab_size));
  line("tokenizer", fmt::format("{} pieces (bos {}, eos {})", ckpt.tokenizer().n_vocab(), c.bos_id,
                                fmt::join(c.eos_ids, ", ")));
  o += "\n";
  line("tensors",
       fmt::format("{} ({}, {} B)", ckpt.text_tensors().size(), human_bytes(tensor_bytes), tensor_bytes));
  for (const auto& [name, tt] : by_type)
    o +=
        fmt::format("  {:<16}{:>5} tensors  {:>12}  {} B\n", name, tt.count, human_bytes(tt.bytes), tt.bytes);
  line("weights", fmt::format("{} ({} B)", human_bytes(weight_bytes), weight_bytes));
  if (list_tensors) {
    o += "\n";
    for (const TensorView* t : ckpt.text_tensors())
      o += fmt::format("  {:<48} {:<8} {:<16} {}\n", t->name, dtype_name(t->dtype), shape_to_string(t->shape),
                       t->nbytes);
  }

  o += fmt::format("\nmemory plan at context {} (KV {}, prefill chunk {}):\n", plan.context, kv_type,
                   plan.chunk);
  auto mem = [&o](std::string_view key, uint64_t bytes, const std::string& note) {
    o += fmt::format("  {:<18}{:>12}  {:>14} B{}{}\n", key, human_bytes(bytes), bytes,
                     note.empty() ? "" : "  ", note);
  };
  mem("weights", weight_bytes, "");
  mem("kv global", plan.global_bytes,
      fmt::format("{} layers x {} slots x {} B", n_global, plan.context, plan.bytes_per_slot));
  mem("kv local rings", plan.local_bytes,
      fmt::format("{} layers x {} slots x {} B (window {} + chunk {} - 1)", n_local, local_slots,
                  plan.bytes_per_slot, c.sliding_window, plan.chunk));
  mem("kv total", plan.total_bytes(), "");
  mem("kv all-global", plan.all_global_bytes,
      fmt::format("if every layer cached the full context: {:.2f}x more", saving));
  mem("scratch", mplan.scratch_bytes, fmt::format("activations of one {}-token chunk", plan.chunk));
  mem("total", mplan.total_bytes(), "weights + kv + scratch (one session)");
  if (context > c.max_context)
    o += fmt::format("note: context {} exceeds the model's max context {}\n", context, c.max_context);
  std::fwrite(o.data(), 1, o.size(), stdout);
  return kExitOk;
}

}  // namespace gemma3::cli
