#include <gtest/gtest.h>

#include "gemma3/status.h"

namespace gemma3 {
namespace {

Result<int> parse_positive(int v) {
  if (v <= 0) return invalid_argument("value must be positive, got " + std::to_string(v));
  return v;
}

Status twice(int v, int* out) {
  GEMMA3_ASSIGN_OR_RETURN(int x, parse_positive(v));
  *out = 2 * x;
  return ok_status();
}

TEST(Status, ResultCarriesValueOrError) {
  int out = 0;
  EXPECT_TRUE(twice(4, &out).ok());
  EXPECT_EQ(out, 8);
  Status s = twice(-1, &out);
  EXPECT_EQ(s.code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(s.to_string(), "invalid argument: value must be positive, got -1");
  EXPECT_EQ(s.with_context("flag -n").message(), "flag -n: value must be positive, got -1");
}

// value() (and * and ->) on an error throws BadResultAccess naming the status, not std::variant's
// bad_variant_access, whichever way the Result is held.
TEST(Status, ValueOfAnErrorNamesTheStatus) {
  Result<int> bad = parse_positive(-3);
  const std::string want =
      "Result::value() called on an error: invalid argument: value must be positive, got -3";
  try {
    (void)bad.value();
    ADD_FAILURE() << "no exception";
  } catch (const BadResultAccess& e) {
    EXPECT_EQ(std::string(e.what()), want);
    EXPECT_EQ(e.status().code(), ErrorCode::kInvalidArgument);
  }
  const Result<int>& cref = bad;
  EXPECT_THROW((void)*cref, BadResultAccess);
  EXPECT_THROW((void)std::move(bad).value(), BadResultAccess);
  Result<std::string> s = Status(ErrorCode::kNotFound, "no file");
  EXPECT_THROW((void)s->size(), BadResultAccess);
  Result<int> good = parse_positive(5);
  EXPECT_EQ(good.value(), 5);
  EXPECT_EQ(*good, 5);
}

}  // namespace
}  // namespace gemma3
