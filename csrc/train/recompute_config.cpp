#include "train/recompute_config.h"

#include <c10/util/Exception.h>

#include "config/yaml_reader.h"
#include "model/recompute.h"

namespace moeyard::train {

void read_recompute(
    config::YamlReader& r, TrainConfig& c, const ModelConfig::KeyNamer& name) {
  auto& t = c.train;
  r.get("recompute", t.recompute);
  r.get("recompute_layers", t.recompute_layers, config::Range::at_least(0));
  parse_recompute(t.recompute, "config: " + r.where("recompute") + ":");
  for (const int64_t l : t.recompute_layers) {
    TORCH_CHECK(
        l < c.model.num_layers,
        "config: ",
        r.where("recompute_layers"),
        ": entry ",
        l,
        " is not a layer index in [0, ",
        name("model.num_layers"),
        " = ",
        c.model.num_layers,
        ")");
  }
}

} // namespace moeyard::train
