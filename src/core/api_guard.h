// The library never throws out of its API (gemma3.h): public entry points run their body
// through api_guard(), which turns an exception that escapes the body (std::bad_alloc, a
// std::ios_base::failure from a library read, a std::system_error from the thread library)
// into an error value naming the call. Code inside keeps returning Status; this is the net
// under it, not the way errors are reported.
#pragma once

#include <exception>
#include <new>
#include <string>

#include "gemma3/status.h"

namespace gemma3 {

template <typename F>
auto api_guard(const char* call, F&& body) noexcept -> decltype(body()) {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return Status(ErrorCode::kOutOfMemory, std::string(call) + ": out of host memory");
  } catch (const std::exception& e) {
    return Status(ErrorCode::kInternal, std::string(call) + ": unexpected exception: " + e.what());
  } catch (...) {
    return Status(ErrorCode::kInternal, std::string(call) + ": unexpected exception");
  }
}

}  // namespace gemma3
