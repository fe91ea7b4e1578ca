// Errors as values. The library never exits or aborts on bad input; every fallible
// entry point returns a Status or a Result<T> whose message names the file, tensor or
// field, the expected and the actual value.
#pragma once

#include <cassert>
#include <stdexcept>
#include <string>
#include <utility>
#include <variant>

namespace gemma3 {

enum class ErrorCode {
  kOk = 0,
  kInvalidArgument,  // bad flag / option / API argument
  kNotFound,         // missing file or tensor
  kInvalidFile,      // malformed or inconsistent checkpoint, image, text
  kUnsupported,      // valid but not handled (tensor type, architecture)
  kOutOfRange,       // prompt longer than context, dimension overflow
  kOutOfMemory,      // allocation or memory plan failed
  kCancelled,        // user stopped generation
  kInternal,         // a bug: an invariant did not hold
  kUnavailable,      // busy now (a full queue): the same call may succeed later
};

const char* error_code_name(ErrorCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(ErrorCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status ok_status() { return {}; }

  bool ok() const { return code_ == ErrorCode::kOk; }
  ErrorCode code() const { return code_; }
  const std::string& message() const { return message_; }
  // "invalid file: <message>"
  std::string to_string() const;
  // Prefixes context ("loading foo.gguf: ") to the message; no-op when ok.
  Status with_context(const std::string& context) const;

 private:
  ErrorCode code_ = ErrorCode::kOk;
  std::string message_;
};

inline Status ok_status() { return {}; }
Status invalid_argument(std::string message);
Status not_found(std::string message);
Status invalid_file(std::string message);
Status unsupported(std::string message);
Status out_of_range(std::string message);
Status out_of_memory(std::string message);
Status cancelled(std::string message);
Status internal_error(std::string message);
Status unavailable(std::string message);

// What Result::value() (and * and ->) throws when the Result holds an error. Calling it then is
// a bug in the caller; what() names the Status, as absl's BadStatusOrAccess does, instead of
// std::variant's bad_variant_access. The library itself checks ok() first: nothing it returns
// throws.
class BadResultAccess : public std::logic_error {
 public:
  explicit BadResultAccess(const Status& status)
      : std::logic_error("Result::value() called on an error: " + status.to_string()), status_(status) {}
  const Status& status() const { return status_; }

 private:
  Status status_;
};

// A value or the Status explaining why there is none.
template <class T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}        // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {  // NOLINT
    if (std::get<Status>(v_).ok()) v_ = Status(ErrorCode::kInternal, "Result built from ok Status");
  }

  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOk;
    return ok() ? kOk : std::get<Status>(v_);
  }
  // The value; throws BadResultAccess (naming the status) when there is none.
  T& value() & { return check(), std::get<T>(v_); }
  const T& value() const& { return check(), std::get<T>(v_); }
  T&& value() && { return check(), std::get<T>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  void check() const {
    if (!ok()) throw BadResultAccess(std::get<Status>(v_));
  }
  std::variant<T, Status> v_;
};

}  // namespace gemma3

#define GEMMA3_CONCAT_INNER(a, b) a##b
#define GEMMA3_CONCAT(a, b) GEMMA3_CONCAT_INNER(a, b)

// Returns the Status from the enclosing function when `expr` (a Status) is not ok.
#define GEMMA3_TRY(expr)                             \
  do {                                               \
    ::gemma3::Status gemma3_status_ = (expr);        \
    if (!gemma3_status_.ok()) return gemma3_status_; \
  } while (0)

// `lhs = value of expr` (a Result<T>), or return its Status.
#define GEMMA3_ASSIGN_OR_RETURN(lhs, expr) \
  GEMMA3_ASSIGN_OR_RETURN_IMPL(GEMMA3_CONCAT(gemma3_result_, __LINE__), lhs, expr)
#define GEMMA3_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                 \
  if (!tmp.ok()) return tmp.status();                \
  lhs = std::move(tmp).value()
