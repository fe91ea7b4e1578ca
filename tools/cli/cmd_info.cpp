// gemma3 info: what a checkpoint is and what it will cost to run, through the public API only
// (gemma3::inspect: metadata, no backend, no KV cache). Its memory plan is the one Model::load
// checks against the backend's free memory, with the same prefill chunk and KV type a session
// would use, so the numbers equal what `run` allocates at that context.
#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>

#include "cli_common.h"
#include "commands.h"

namespace gemma3::cli {

namespace {

struct TypeTotal {
  int count = 0;
  uint64_t bytes = 0;
};

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
               "prefill chunk the plan assumes; local rings hold W+N-1 slots (default: 256, the CPU's; "
               "CUDA sessions use 512)");
  int sequences = 1;
  p.add_option("--parallel", "N", &sequences,
               "plan for N sequences decoded together (an Engine of N sequences; default: 1)");
  uint64_t kv_tokens = 0;
  p.add_option("--kv-tokens", "N", &kv_tokens,
               "with --parallel: global-layer KV positions the sequences share, in pages (default: N x ctx)");
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
  if (sequences < 1)
    return fail("info", kExitUsage, fmt::format("--parallel must be >= 1, got {}", sequences));

  PlanOptions plan_options;
  plan_options.context = context;                                             // 0: the model's maximum
  plan_options.kv_type = kv_type_from_name(kv_type).value_or(KvType::kBF16);  // add_choice: known names
  plan_options.prefill_chunk = chunk;
  plan_options.sequences = sequences;
  plan_options.kv_tokens = static_cast<int64_t>(std::min<uint64_t>(kv_tokens, uint64_t{1} << 40));
  auto info_or = inspect(model_path, plan_options);
  if (!info_or.ok()) return fail("info", info_or.status());
  const ModelInfo& c = *info_or;
  const MemoryReport& plan = c.memory;

  std::map<std::string, TypeTotal> by_type;  // type name -> count, bytes
  uint64_t tensor_bytes = 0;
  for (const TensorInfo& t : c.tensors) {
    TypeTotal& tt = by_type[t.type];
    ++tt.count;
    tt.bytes += t.bytes;
    tensor_bytes += t.bytes;
  }
  const uint64_t weight_bytes = c.weight_bytes;
  const int n_global = static_cast<int>(std::count(c.layer_pattern.begin(), c.layer_pattern.end(), 'G'));
  const int n_local = c.n_layers - n_global;
  const uint64_t kv_total = plan.kv_global_bytes + plan.kv_local_bytes + plan.kv_checkpoint_bytes;
  const double saving = kv_total ? static_cast<double>(plan.kv_all_global_bytes) / kv_total : 0;

  if (output == "json") {
    nlohmann::json types = nlohmann::json::object();
    for (const auto& [name, tt] : by_type) types[name] = {{"count", tt.count}, {"bytes", tt.bytes}};
    nlohmann::json j = {
        {"path", c.path},
        {"format", c.format},
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
        {"layer_pattern", c.layer_pattern},
        {"max_context", c.max_context},
        {"rope",
         {{"theta_local", c.rope_theta_local},
          {"theta_global", c.rope_theta_global},
          {"scale_global", c.rope_scale_global}}},
        {"query_pre_attn_scalar", c.query_pre_attn_scalar},
        {"attn_scale", c.attention_scale},
        {"rms_norm_eps", c.rms_norm_eps},
        {"vocab_rows", c.vocab_size},
        {"tokenizer_size", c.tokenizer_size},
        {"bos_id", c.bos_id},
        {"eos_ids", c.eos_ids},
        {"has_vision", c.has_vision},
        {"tensors", {{"count", c.tensors.size()}, {"bytes", tensor_bytes}, {"by_type", types}}},
        {"weight_bytes", weight_bytes},
        {"memory",
         {{"context", plan.context},
          {"sequences", plan.sequences},
          {"chunk", plan.prefill_chunk},
          {"kv_type", kv_type},
          {"bytes_per_slot", plan.kv_bytes_per_slot},
          {"global_slots", plan.context},
          {"local_slots", plan.kv_local_slots},
          {"weight_bytes", weight_bytes},
          {"kv_global_bytes", plan.kv_global_bytes},
          {"kv_pages", plan.kv_pages},
          {"kv_page_tokens", plan.kv_page_tokens},
          {"kv_page_bytes", plan.kv_page_bytes},
          {"kv_local_bytes", plan.kv_local_bytes},
          {"kv_checkpoint_bytes", plan.kv_checkpoint_bytes},
          {"kv_total_bytes", kv_total},
          {"kv_all_global_bytes", plan.kv_all_global_bytes},
          {"kv_saving", saving},
          {"scratch_bytes", plan.scratch_bytes},
          {"total_bytes", plan.total_bytes()}}},
    };
    if (list_tensors) {
      nlohmann::json list = nlohmann::json::array();
      for (const TensorInfo& t : c.tensors)
        list.push_back({{"name", t.name}, {"type", t.type}, {"shape", t.shape}, {"bytes", t.bytes}});
      j["tensor_list"] = list;
    }
    std::printf("%s\n", j.dump(2).c_str());
    return kExitOk;
  }

  std::string o;
  auto line = [&o](std::string_view key, const std::string& value) {
    o += fmt::format("{:<18}{}\n", key, value);
  };
  line("model", fmt::format("{} ({})", c.path, c.format));
  line("size", c.size_label + (c.has_vision ? " (text + vision)" : " (text)"));
  line("layers", fmt::format("{} ({} global, {} local)", c.n_layers, n_global, n_local));
  line("pattern", c.layer_pattern);
  line("hidden H", std::to_string(c.hidden));
  line("intermediate I", std::to_string(c.intermediate));
  line("heads", fmt::format("{} query, {} kv, head dim {}", c.n_heads, c.n_kv_heads, c.head_dim));
  line("sliding window", std::to_string(c.sliding_window));
  line("max context", std::to_string(c.max_context));
  line("rope", fmt::format("local theta {}, global theta {}, global linear scale {}", c.rope_theta_local,
                           c.rope_theta_global, c.rope_scale_global));
  line("attention scale",
       fmt::format("{:.7g} (query_pre_attn_scalar {:g})", c.attention_scale, c.query_pre_attn_scalar));
  line("rms norm eps", fmt::format("{:g}", c.rms_norm_eps));
  line("vocab rows", std::to_string(c.vocab_size));
  line("tokenizer",
       fmt::format("{} pieces (bos {}, eos {})", c.tokenizer_size, c.bos_id, fmt::join(c.eos_ids, ", ")));
  o += "\n";
  line("tensors", fmt::format("{} ({}, {} B)", c.tensors.size(), human_bytes(tensor_bytes), tensor_bytes));
  for (const auto& [name, tt] : by_type)
    o +=
        fmt::format("  {:<16}{:>5} tensors  {:>12}  {} B\n", name, tt.count, human_bytes(tt.bytes), tt.bytes);
  line("weights", fmt::format("{} ({} B)", human_bytes(weight_bytes), weight_bytes));
  if (list_tensors) {
    o += "\n";
    for (const TensorInfo& t : c.tensors)
      o += fmt::format("  {:<48} {:<8} {:<16} {}\n", t.name, t.type,
                       fmt::format("[{}]", fmt::join(t.shape, ", ")), t.bytes);
  }

  o += fmt::format("\nmemory plan at context {} (KV {}, prefill chunk {}):\n", plan.context, kv_type,
                   plan.prefill_chunk);
  auto mem = [&o](std::string_view key, uint64_t bytes, const std::string& note) {
    o += fmt::format("  {:<18}{:>12}  {:>14} B{}{}\n", key, human_bytes(bytes), bytes,
                     note.empty() ? "" : "  ", note);
  };
  mem("weights", weight_bytes, "");
  const std::string per = plan.sequences > 1 ? fmt::format("{} sequences x ", plan.sequences) : "";
  if (plan.kv_pages > 0)
    mem("kv global", plan.kv_global_bytes,
        fmt::format("a pool of {} pages of {} positions ({} B: {} layers x {} slots x {} B), shared by the "
                    "{} sequences, mapped as they grow",
                    plan.kv_pages, plan.kv_page_tokens, plan.kv_page_bytes, n_global, plan.kv_page_tokens,
                    plan.kv_bytes_per_slot, plan.sequences));
  else
    mem("kv global", plan.kv_global_bytes,
        fmt::format("{}{} layers x {} slots x {} B", per, n_global, plan.context, plan.kv_bytes_per_slot));
  mem("kv local rings", plan.kv_local_bytes,
      fmt::format("{}{} layers x {} slots x {} B (window {} + chunk {} - 1)", per, n_local,
                  plan.kv_local_slots, plan.kv_bytes_per_slot, c.sliding_window, plan.prefill_chunk));
  if (plan.kv_checkpoint_bytes > 0)
    mem("kv checkpoints", plan.kv_checkpoint_bytes,
        "each sequence's rings at the end of its prompt (prefix reuse)");
  mem("kv total", kv_total, "");
  mem("kv all-global", plan.kv_all_global_bytes,
      fmt::format("if every layer cached the full context: {:.2f}x more", saving));
  mem("scratch", plan.scratch_bytes,
      plan.sequences > 1 ? fmt::format("activations of one {}-token step, logits of {} rows",
                                       std::max(plan.prefill_chunk, plan.sequences), plan.sequences)
                         : fmt::format("activations of one {}-token chunk", plan.prefill_chunk));
  mem("total", plan.total_bytes(),
      plan.sequences > 1 ? fmt::format("weights + kv + scratch ({} sequences)", plan.sequences)
                         : std::string("weights + kv + scratch (one session)"));
  std::fwrite(o.data(), 1, o.size(), stdout);
  return kExitOk;
}

}  // namespace gemma3::cli
