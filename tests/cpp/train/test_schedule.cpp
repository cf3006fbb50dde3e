// The one schedule type: the learning rate's factor is a Schedule, and it
// gives the same doubles, bit for bit, as the closed forms of each lr
// schedule written out here; MoE option schedules follow their types.

#include <gtest/gtest.h>

#include <cmath>

#include "train/train_config.h"

namespace {

using moeyard::train::OptimConfig;
using moeyard::train::Schedule;

// The lr factor of each schedule written out directly.
double closed_form(const OptimConfig& o, int64_t step, int64_t total) {
  if (step < o.warmup) {
    return static_cast<double>(step + 1) / o.warmup;
  }
  const double lo = o.min_lr_ratio;
  const double f = static_cast<double>(step - o.warmup) /
                   std::max<int64_t>(total - o.warmup, 1);
  if (o.lr_schedule == "constant") {
    return 1.0;
  }
  if (o.lr_schedule == "linear") {
    return 1.0 - (1.0 - lo) * f;
  }
  if (o.lr_schedule == "wsd") {
    const double d = o.wsd_decay_fraction;
    return f < 1.0 - d ? 1.0 : 1.0 - (1.0 - lo) * (f - (1.0 - d)) / d;
  }
  return lo + (1.0 - lo) * 0.5 * (1.0 + std::cos(M_PI * f));
}

TEST(Schedule, LrFactorIsBitwiseTheClosedForm) {
  for (const char* type : {"cosine", "linear", "constant", "wsd"}) {
    for (int64_t warmup : {0, 1, 7}) {
      for (double lo : {0.0, 0.1, 0.37}) {
        for (int64_t total : {1, 40, 333}) {
          OptimConfig o;
          o.lr_schedule = type;
          o.warmup = warmup;
          o.min_lr_ratio = lo;
          o.wsd_decay_fraction = 0.3;
          const auto s = o.lr_factor();
          for (int64_t step = 0; step < total; ++step) {
            const double want = closed_form(o, step, total);
            ASSERT_EQ(s.value(step, total), want)
                << type << " warmup " << warmup << " lo " << lo << " total "
                << total << " step " << step;
          }
        }
      }
    }
  }
}

TEST(Schedule, TypesMoveFromStartToEnd) {
  Schedule s;
  s.start = 4;
  s.end = 2;
  s.begin = 10;
  s.steps = 4;
  const auto at = [&](const char* type, int64_t step) {
    s.type = type;
    return s.value(step, 100);
  };
  EXPECT_EQ(at("constant", 50), 4);
  EXPECT_EQ(at("linear", 9), 4); // before begin: start
  EXPECT_EQ(at("linear", 12), 3);
  EXPECT_EQ(at("linear", 99), 2); // after the move: end
  EXPECT_EQ(at("cosine", 12), 3);
  EXPECT_EQ(at("step", 13), 4);
  EXPECT_EQ(at("step", 14), 2);
  s.decay_fraction = 0.5;
  EXPECT_EQ(at("wsd", 11), 4); // stable for the first half of the move
  EXPECT_EQ(at("wsd", 13), 3); // then linear over the second half
  s.warmup = 4;
  EXPECT_EQ(at("linear", 1), 2); // warmup: (step + 1) / warmup * start
}

} // namespace
