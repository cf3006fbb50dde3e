#include <gtest/gtest.h>
#include "ops/ops.h"
#include <ATen/ATen.h>
TEST(Smoke, Swiglu) {
  auto x = at::randn({4, 8});
  auto y = moeyard::ops::swiglu(x);
  EXPECT_EQ(y.size(1), 4);
}
