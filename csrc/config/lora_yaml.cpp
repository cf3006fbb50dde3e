#include "config/lora_yaml.h"

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <algorithm>

#include "util/dtype.h"

namespace moeyard::config {

void read_finetune(YamlReader r, LoraOptions& o) {
  auto l = r.child("lora");
  o.enabled = l.given();
  if (o.enabled && !l.is_map()) {
    r.fail(
        "lora",
        "expected a mapping {rank, alpha, dropout, targets, base_dtype} "
        "(absent or null: off)");
  }
  if (o.enabled) {
    l.get("rank", o.rank, Range::at_least(1));
    l.get("alpha", o.alpha, Range::greater_than(0));
    l.get("dropout", o.dropout, Range::closed_open(0, 1));
    l.get("targets", o.targets);
    l.get("base_dtype", o.base_dtype);
    const auto& known = lora_target_names();
    for (const auto& t : o.targets) {
      if (std::find(known.begin(), known.end(), t) == known.end()) {
        l.fail(
            "targets",
            "unknown target '" + t + "' (one of: " + c10::Join(", ", known) +
                ")");
      }
    }
    if (o.targets.empty()) {
      l.fail(
          "targets",
          "is empty; name at least one of: " + c10::Join(", ", known));
    }
    auto names = dtype_names();
    if (o.base_dtype != "model" &&
        std::find(names.begin(), names.end(), o.base_dtype) == names.end()) {
      l.fail(
          "base_dtype",
          "must be model or one of " + c10::Join(", ", names) + ", got '" +
              o.base_dtype + "'");
    }
  }
  l.finish();
  r.finish();
}

} // namespace moeyard::config
