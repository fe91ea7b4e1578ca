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

}  // namespace
}  // namespace gemma3
