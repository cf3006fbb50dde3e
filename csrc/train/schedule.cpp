#include "train/schedule.h"

#include <algorithm>
#include <cmath>

#include "config/yaml_reader.h"

namespace moeyard::train {

double Schedule::value(int64_t step, int64_t total) const {
  if (step < warmup) {
    return static_cast<double>(step + 1) / warmup * start;
  }
  const int64_t len = steps > 0 ? steps : std::max<int64_t>(total - begin, 1);
  const double f =
      std::clamp(static_cast<double>(step - begin) / len, 0.0, 1.0);
  if (type == "constant") {
    return start;
  }
  if (type == "linear") {
    return start + (end - start) * f;
  }
  if (type == "cosine") {
    return end + (start - end) * 0.5 * (1 + std::cos(M_PI * f));
  }
  if (type == "wsd") {
    const double d = decay_fraction;
    return f < 1.0 - d ? start : start + (end - start) * (f - (1.0 - d)) / d;
  }
  // step: start until the move ends, then end
  return f < 1.0 ? start : end;
}

void read_schedule(
    config::YamlReader r, Schedule& s, const config::Range& values) {
  if (!r.given()) {
    s = Schedule{};
    return;
  }
  r.get("type", s.type);
  r.get("start", s.start, values);
  r.get("end", s.end, values);
  r.get("steps", s.steps, config::Range::at_least(0));
  r.get("begin", s.begin, config::Range::at_least(0));
  r.get("warmup", s.warmup, config::Range::at_least(0));
  r.get("decay_fraction", s.decay_fraction, config::Range::open_closed(0, 1));
  r.finish();
  if (s.type != "constant" && s.type != "linear" && s.type != "cosine" &&
      s.type != "step" && s.type != "wsd") {
    r.fail(
        "type",
        "must be constant, linear, cosine, step or wsd, got '" + s.type + "'");
  }
  if (!r.has("start")) {
    r.fail("start", "is required (null or no schedule keeps the moe: value)");
  }
  if (!r.has("end")) {
    if (s.type != "constant") {
      r.fail("end", "is required with type '" + s.type + "'");
    }
    s.end = s.start;
  }
  s.enabled = true;
}

} // namespace moeyard::train
