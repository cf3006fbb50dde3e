// config::YamlReader: ranges, and where an error says a value came from.

#include <c10/util/Exception.h>
#include <gtest/gtest.h>
#include <yaml-cpp/yaml.h>

#include <functional>
#include <limits>
#include <memory>
#include <string>

#include "config/yaml_reader.h"

namespace moeyard::config {
namespace {

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

TEST(Range, ContainsAndShows) {
  const double inf = std::numeric_limits<double>::infinity();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  EXPECT_TRUE(Range::closed_open(0, 1).contains(0));
  EXPECT_FALSE(Range::closed_open(0, 1).contains(1));
  EXPECT_FALSE(Range::greater_than(0).contains(0));
  EXPECT_TRUE(Range::open_closed(0, 1).contains(1));
  EXPECT_TRUE(Range::closed(1, 4).contains(4));
  for (const auto& r :
       {Range::any(), Range::at_least(0), Range::closed(-inf, inf)}) {
    EXPECT_FALSE(r.contains(nan));
    EXPECT_FALSE(r.contains(inf));
    EXPECT_FALSE(r.contains(-inf));
  }
  EXPECT_EQ(Range::closed_open(0, 1).str(), "[0, 1)");
  EXPECT_EQ(Range::greater_than(0).str(), "(0, inf)");
  EXPECT_EQ(Range::any().str(), "(-inf, inf)");
  EXPECT_EQ(Range::closed(0.5, 1e-8).str(), "[0.5, 1e-08]");
  EXPECT_EQ(Range::closed(1, 4).shown_as("[1, E = 4]").str(), "[1, E = 4]");
}

TEST(YamlReader, NumbersOutsideTheirRangeNameKeyValueRange) {
  YamlReader r(
      YAML::Load("a: 1.5\nb: .inf\nc: -3\nd: .nan\ne: 2\n"), "s", "f.yaml");
  double d = 0;
  int64_t i = 0;
  EXPECT_EQ(
      error_of([&] { r.get("a", d, Range::closed_open(0, 1)); }),
      "config: s.a (f.yaml:1): 1.5 is outside [0, 1)");
  EXPECT_EQ(
      error_of([&] { r.get("b", d, Range::any()); }),
      "config: s.b (f.yaml:2): .inf is outside (-inf, inf)");
  EXPECT_EQ(
      error_of([&] { r.get("c", i, Range::at_least(0)); }),
      "config: s.c (f.yaml:3): -3 is outside [0, inf)");
  EXPECT_EQ(
      error_of([&] { r.get("d", d, Range::any()); }),
      "config: s.d (f.yaml:4): .nan is outside (-inf, inf)");
  r.get("e", i, Range::closed(1, 2));
  EXPECT_EQ(i, 2);
  d = 7;
  r.get("absent", d, Range::closed(0, 1)); // the default stays
  EXPECT_EQ(d, 7);
}

TEST(YamlReader, OverriddenKeysCiteTheSetArgument) {
  auto s = std::make_shared<Sources>();
  s->file = "x.yaml";
  s->add_override("optim.lr", "optim.lr=inf");
  s->add_override("optim.groups", "optim.groups=[{lr_mult: -1}]");
  s->add_override("moe.top_k", "moe.top_k=9");
  s->add_override("moe", "moe={top_k: 3}"); // replaces moe.top_k's record
  EXPECT_EQ(*s->override_of("optim.lr"), "optim.lr=inf");
  EXPECT_EQ(
      *s->override_of("optim.groups[0].lr_mult"),
      "optim.groups=[{lr_mult: -1}]");
  EXPECT_EQ(*s->override_of("moe.top_k"), "moe={top_k: 3}");
  EXPECT_EQ(s->override_of("optim.lr_schedule"), nullptr);
  EXPECT_EQ(s->override_of("optim"), nullptr);

  YamlReader top(
      YAML::Load("optim:\n  lr: inf\n  eps: 1.0e-8\nmoe:\n  top_k: 3\n"),
      "",
      s);
  auto optim = top.child("optim");
  double v = 0;
  EXPECT_EQ(
      error_of([&] { optim.get("lr", v, Range::greater_than(0)); }),
      "config: optim.lr (--set optim.lr=inf): inf is outside (0, inf)");
  EXPECT_EQ(top.locate("optim.eps"), " (x.yaml:3)");
  EXPECT_EQ(top.locate("moe.top_k"), " (--set moe={top_k: 3})");
  EXPECT_EQ(top.locate("optim.beta1"), "");
}

TEST(YamlReader, GivenTellsAbsentAndNullFromAMapping) {
  YamlReader r(YAML::Load("a: {x: 1}\nb: null\nc: {}\n"), "");
  EXPECT_TRUE(r.child("a").given());
  EXPECT_FALSE(r.child("b").given());
  EXPECT_TRUE(r.child("c").given());
  EXPECT_FALSE(r.child("d").given());
}

} // namespace
} // namespace moeyard::config
