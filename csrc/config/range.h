#pragma once
// The valid values of a number in a config or an option (Range) and how
// messages show numbers. Free of YAML: the model's option tables declare
// their ranges with it.

#include <string>

namespace moeyard::config {

// The valid values of a numeric field: an interval with open or closed ends,
// always excluding NaN and the infinities.
class Range {
 public:
  static Range any(); // (-inf, inf): every finite number
  static Range at_least(double lo); // [lo, inf)
  static Range greater_than(double lo); // (lo, inf)
  static Range closed(double lo, double hi); // [lo, hi]
  static Range closed_open(double lo, double hi); // [lo, hi)
  static Range open_closed(double lo, double hi); // (lo, hi]

  // The same interval, shown as `text` in messages (for bounds that come
  // from another key: "[1, moe.num_experts (tiny.yaml:14) = 4]").
  Range shown_as(std::string text) const;

  bool contains(double v) const;
  std::string str() const; // "[0, 1)", "(0, inf)"

 private:
  Range(double lo, bool lo_open, double hi, bool hi_open);
  double lo_, hi_;
  bool lo_open_, hi_open_;
  std::string text_;
};

// A number as messages show it: 64, 0.5, 1e-08, inf, nan.
std::string show_number(double v);

// Errors unless `range` contains `v`: "config: <name>: <v> is outside
// <range>" (for values that did not come from YAML, e.g. a Hugging Face
// config.json).
void check_range(const std::string& name, double v, const Range& range);

} // namespace moeyard::config
