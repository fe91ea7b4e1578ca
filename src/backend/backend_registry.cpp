// The CUDA backend's entry points (backend.h): the backend linked into this program, or the
// module libgemma3-cuda.so loaded on first use (src/backend/cuda/cuda_module.h), or, in a
// build without CUDA, an error saying so.
#include <dlfcn.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda/cuda_module.h"

// Defined when the backend is linked in (the emulator build, the CUDA test binaries); null
// otherwise. The emulator build compiles the backend into libgemma3, a static archive there, and
// a weak reference pulls nothing out of an archive: it takes a strong one.
#if defined(GEMMA3_CUDA_EMU)
extern "C" const gemma3::CudaModuleApi* gemma3_cuda_module();
#else
extern "C" const gemma3::CudaModuleApi* gemma3_cuda_module() __attribute__((weak));
#endif

namespace gemma3 {
namespace {

// The backend linked into this program, if any.
const CudaModuleApi* linked_module() {
#if defined(GEMMA3_CUDA_EMU)
  return gemma3_cuda_module();
#else
  return gemma3_cuda_module ? gemma3_cuda_module() : nullptr;
#endif
}

struct CudaModule {
  const CudaModuleApi* api = nullptr;
  std::string error;  // why there is none
};

CudaModule checked(const CudaModuleApi* api, const std::string& where) {
  if (!api || api->abi != kCudaModuleAbi || std::string(api->version) != GEMMA3_VERSION)
    return {nullptr, "the CUDA backend module " + where + " is from another build of gemma3 (version " +
                         (api ? api->version : "?") + ", module ABI " + std::to_string(api ? api->abi : 0) +
                         "); this library is version " GEMMA3_VERSION ", ABI " +
                         std::to_string(kCudaModuleAbi) + ": install the two together"};
  return {api, ""};
}

#if defined(GEMMA3_CUDA_MODULE)
std::string dir_of(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? std::string() : path.substr(0, slash);
}

// Where to look, in order: $GEMMA3_CUDA_MODULE (a path) alone when set; else the folder of the
// file holding libgemma3's code (libgemma3.so, or the program it is linked into) and of the
// running program, each also with bin/ -> lib/ of the install layout; then the dynamic loader's
// own search (RUNPATH, LD_LIBRARY_PATH, ld.so.cache).
std::vector<std::string> module_candidates() {
  if (const char* env = std::getenv("GEMMA3_CUDA_MODULE"); env && *env) return {env};
  std::vector<std::string> dirs, out;
  Dl_info info{};
  if (dladdr(reinterpret_cast<const void*>(&module_candidates), &info) && info.dli_fname)
    if (char* real = realpath(info.dli_fname, nullptr)) {
      dirs.push_back(dir_of(real));
      free(real);
    }
  if (char* exe = realpath("/proc/self/exe", nullptr)) {
    dirs.push_back(dir_of(exe));
    free(exe);
  }
  for (const std::string& d : dirs)
    for (const std::string& p :
         {d + "/" GEMMA3_CUDA_MODULE, d + "/" GEMMA3_CUDA_MODULE_RELDIR "/" GEMMA3_CUDA_MODULE})
      if (!d.empty() && std::find(out.begin(), out.end(), p) == out.end()) out.push_back(p);
  out.push_back(GEMMA3_CUDA_MODULE);
  return out;
}

CudaModule load_module() {
  std::string looked;
  for (const std::string& path : module_candidates()) {
    const bool bare = path.find('/') == std::string::npos;
    if (!bare && access(path.c_str(), F_OK) != 0) {
      looked += (looked.empty() ? "" : ", ") + path;
      continue;
    }
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);  // never closed (cuda_module.h)
    if (!handle) {
      const std::string why = dlerror();
      // The module itself is missing from the loader's path: report where we looked. Anything
      // else (a CUDA library it needs is missing, a bad file) is the loader's own message.
      if (bare && why.find(GEMMA3_CUDA_MODULE ": cannot open shared object file") != std::string::npos) break;
      return {nullptr, "could not load the CUDA backend module " + path + ": " + why};
    }
    auto entry = reinterpret_cast<const CudaModuleApi* (*)()>(dlsym(handle, "gemma3_cuda_module"));
    if (!entry)
      return {nullptr, path + " is not a gemma3 CUDA backend module (no gemma3_cuda_module symbol)"};
    return checked(entry(), path);
  }
  return {nullptr, "the CUDA backend module " GEMMA3_CUDA_MODULE " was not found (looked for " + looked +
                       " and on the library search path); it is built with the CUDA toolkit and installed "
                       "beside libgemma3, or named by $GEMMA3_CUDA_MODULE"};
}
#endif

const CudaModule& cuda_module() {
  static const CudaModule module = []() -> CudaModule {
    if (const CudaModuleApi* api = linked_module()) return checked(api, "linked into this program");
#if defined(GEMMA3_CUDA_MODULE)
    return load_module();
#else
    return {
        nullptr,
        "this build of gemma3 has no CUDA backend (configure with -DGEMMA3_CUDA=ON); use BackendKind::kCpu"};
#endif
  }();
  return module;
}

}  // namespace

Result<std::unique_ptr<Backend>> make_cuda_backend(const BackendOptions& options) {
  const CudaModule& m = cuda_module();
  if (!m.api) return unsupported(m.error);
  return m.api->create(options);
}

bool cuda_backend_available() {
  // Without an NVIDIA driver no device can be visible: a CPU machine with the module installed
  // then never loads it and the CUDA libraries it brings (~570 MB mapped).
  if (!linked_module() && !dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL)) {
    (void)dlerror();
    return false;
  }
  const CudaModule& m = cuda_module();
  return m.api && m.api->available();
}

Status cuda_backend_status(Backend& backend) {
  const CudaModule& m = cuda_module();
  return m.api ? m.api->status(backend) : ok_status();
}

}  // namespace gemma3
