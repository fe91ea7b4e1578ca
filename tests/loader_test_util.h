// Test helpers: rewrite a GGUF (metadata and tensors copied through GgufWriter, with edits) and
// a safetensors file (drop tensors), to make checkpoints that are wrong in exactly one way.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "checkpoint/gguf.h"
#include "dev/gguf_writer.h"
#include "io/mapped_file.h"

namespace gemma3::testutil {

// A tensor to write: its declaration and (when the size still matches) the source bytes.
struct TensorPlan {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;  // HF order
  const TensorView* src = nullptr;
  std::vector<uint8_t> bytes;  // when non-empty, written instead of src
};

struct GgufEdit {
  // Before tensors are declared: edit metadata and the tensor list (remove, reshape, rename).
  std::function<void(GgufWriter&, std::vector<TensorPlan>&)> before;
  // After they are declared: edit raw tensor infos (type ids, ne) through mutable_tensors().
  std::function<void(GgufWriter&)> after;
};

// Copies every key of `f` into `w`, keeping value types for what our files contain.
inline void copy_metadata(const GgufFile& f, GgufWriter& w) {
  for (const std::string& k : f.keys()) {
    if (k == "general.alignment") continue;
    GgufType t = *f.type_of(k);
    switch (t) {
      case GgufType::kString: w.set_string(k, *f.get_string(k)); break;
      case GgufType::kBool: w.set_bool(k, *f.get_bool(k)); break;
      case GgufType::kFloat32:
      case GgufType::kFloat64: w.set_f32(k, static_cast<float>(*f.get_float(k))); break;
      case GgufType::kInt32: w.set_i32(k, static_cast<int32_t>(*f.get_int(k))); break;
      case GgufType::kArray: {
        if (auto s = f.get_string_array(k); s.ok()) {
          w.set_string_array(k, *s);
        } else if (k.find("scores") != std::string::npos || k.find("mean") != std::string::npos ||
                   k.find("std") != std::string::npos) {
          w.set_f32_array(k, *f.get_float_array(k));
        } else {
          const std::vector<int64_t> ints = *f.get_int_array(k);  // named: *temporary would dangle
          std::vector<int32_t> v(ints.begin(), ints.end());
          w.set_i32_array(k, v);
        }
        break;
      }
      default: w.set_u32(k, static_cast<uint32_t>(*f.get_int(k))); break;
    }
  }
}

// Rewrites `src` to `dst` with `edit` applied. Tensors keep their bytes when the size is
// unchanged; otherwise they are filled with zeros.
inline void rewrite_gguf(const std::string& src, const std::string& dst, const GgufEdit& edit) {
  auto f = GgufFile::open(src);
  ASSERT_TRUE(f.ok()) << f.status().to_string();
  GgufWriter w;
  copy_metadata(*f, w);
  std::vector<TensorPlan> plan;
  for (const TensorView& t : f->tensors()) plan.push_back({t.name, t.dtype, t.shape, &t});
  if (edit.before) edit.before(w, plan);
  for (const TensorPlan& p : plan) ASSERT_TRUE(w.add_tensor(p.name, p.dtype, p.shape).ok()) << p.name;
  if (edit.after) edit.after(w);
  Status s = w.write(dst, [&](size_t i, const GgufWriter::TensorInfo& info, GgufSink& sink) -> Status {
    if (i < plan.size() && !plan[i].bytes.empty())
      return sink.write(plan[i].bytes.data(), plan[i].bytes.size());
    const TensorView* t = i < plan.size() ? plan[i].src : nullptr;
    if (t && t->nbytes == info.nbytes) return sink.write(t->data, t->nbytes);
    std::vector<uint8_t> zeros(info.nbytes);
    return sink.write(zeros.data(), zeros.size());
  });
  ASSERT_TRUE(s.ok()) << s.to_string();
}

inline TensorPlan* find_plan(std::vector<TensorPlan>& plan, const std::string& name) {
  for (TensorPlan& p : plan)
    if (p.name == name) return &p;
  ADD_FAILURE() << "no tensor " << name;
  return nullptr;
}

// Rewrites a safetensors file without the tensors `drop` names (offsets recomputed).
inline void drop_safetensors(const std::string& path, const std::vector<std::string>& drop) {
  std::string bytes;
  {
    std::ifstream in(path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  uint64_t n;
  std::memcpy(&n, bytes.data(), 8);
  nlohmann::ordered_json h = nlohmann::ordered_json::parse(bytes.substr(8, n));
  const std::string data = bytes.substr(8 + n);
  std::vector<std::pair<uint64_t, std::string>> order;
  for (auto& [k, v] : h.items())
    if (k != "__metadata__") order.push_back({v["data_offsets"][0].get<uint64_t>(), k});
  std::sort(order.begin(), order.end());
  nlohmann::ordered_json out = nlohmann::ordered_json::object();
  if (h.contains("__metadata__")) out["__metadata__"] = h["__metadata__"];
  std::string out_data;
  for (auto& [off, k] : order) {
    if (std::find(drop.begin(), drop.end(), k) != drop.end()) continue;
    nlohmann::ordered_json e = h[k];
    const uint64_t b = e["data_offsets"][0], end = e["data_offsets"][1];
    e["data_offsets"] = {out_data.size(), out_data.size() + (end - b)};
    out_data += data.substr(b, end - b);
    out[k] = e;
  }
  std::string hs = out.dump();
  hs.append((8 - hs.size() % 8) % 8, ' ');
  std::ofstream o(path, std::ios::binary | std::ios::trunc);
  const uint64_t hn = hs.size();
  o.write(reinterpret_cast<const char*>(&hn), 8);
  o << hs << out_data;
}

// A fresh, empty folder under the test temp dir, private to this process: ctest runs each
// test in its own process, in parallel, and suites set up and tear down their folder.
inline std::string temp_dir(const std::string& name) {
  const std::string d = testing::TempDir() + "gemma3_" + name + "_" + std::to_string(getpid());
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d;
}

}  // namespace gemma3::testutil
