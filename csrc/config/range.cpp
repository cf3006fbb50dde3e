// Range (the valid values of a number in a config), show_number and
// check_range: how a number's bounds are written in errors.

#include "config/range.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <sstream>

namespace moeyard::config {
namespace {
constexpr double kInf = std::numeric_limits<double>::infinity();
} // namespace

Range::Range(double lo, bool lo_open, double hi, bool hi_open)
    : lo_(lo), hi_(hi), lo_open_(lo_open), hi_open_(hi_open) {}

Range Range::any() {
  return Range(-kInf, true, kInf, true);
}
Range Range::at_least(double lo) {
  return Range(lo, false, kInf, true);
}
Range Range::greater_than(double lo) {
  return Range(lo, true, kInf, true);
}
Range Range::closed(double lo, double hi) {
  return Range(lo, false, hi, false);
}
Range Range::closed_open(double lo, double hi) {
  return Range(lo, false, hi, true);
}
Range Range::open_closed(double lo, double hi) {
  return Range(lo, true, hi, false);
}

Range Range::shown_as(std::string text) const {
  Range r = *this;
  r.text_ = std::move(text);
  return r;
}

bool Range::contains(double v) const {
  if (!std::isfinite(v)) {
    return false;
  }
  return (lo_open_ ? v > lo_ : v >= lo_) && (hi_open_ ? v < hi_ : v <= hi_);
}

std::string Range::str() const {
  if (!text_.empty()) {
    return text_;
  }
  return std::string(lo_open_ ? "(" : "[") + show_number(lo_) + ", " +
         show_number(hi_) + (hi_open_ ? ")" : "]");
}

std::string show_number(double v) {
  if (std::isnan(v)) {
    return "nan";
  }
  if (std::isinf(v)) {
    return v > 0 ? "inf" : "-inf";
  }
  if (v == std::floor(v) && std::abs(v) < 1e15) {
    return std::to_string(static_cast<long long>(v));
  }
  std::ostringstream s;
  s.precision(6);
  s << v;
  return s.str();
}

void check_range(const std::string& name, double v, const Range& range) {
  TORCH_CHECK(
      range.contains(v),
      "config: ",
      name,
      ": ",
      show_number(v),
      " is outside ",
      range.str());
}

} // namespace moeyard::config
