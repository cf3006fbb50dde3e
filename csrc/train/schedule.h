#pragma once
// The one schedule type: the learning rate's factor and every scheduled MoE
// option (`schedule.<option>`) change over training through a Schedule.

#include <cstdint>
#include <string>

namespace moeyard::config {
class YamlReader;
class Range;
} // namespace moeyard::config

namespace moeyard::train {

// A value that changes over training: the learning rate (its factor, see
// OptimConfig::lr_factor) and every scheduled MoE option use this one type.
struct Schedule {
  // Whether the config gives this schedule; off, the option keeps its fixed
  // value.
  bool enabled = false;
  std::string type = "constant"; // constant | linear | cosine | step | wsd
  double start = 0.0;
  double end = 0.0;
  int64_t warmup = 0; // first steps: linear ramp from 0 to start
  int64_t steps = 0; // length of the start->end move (0: to the run's end)
  int64_t begin = 0; // step the move starts at
  double decay_fraction = 0.2; // wsd: start, then the move's last fraction
                               // goes linearly to end
  double value(int64_t step, int64_t total_steps) const;
};

// A schedule's mapping (`{type, start, end, steps, begin, warmup,
// decay_fraction}`): absent or null is off; given, it needs a start, and an
// end unless constant, both in `values`.
void read_schedule(
    config::YamlReader r, Schedule& s, const config::Range& values);

} // namespace moeyard::train
