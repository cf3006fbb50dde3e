#pragma once
// train.recompute and train.recompute_layers: which part of which blocks
// recomputes its activations in backward (model/recompute.h).

#include "train/train_config.h"

namespace moeyard::config {
class YamlReader;
}

namespace moeyard::train {

// Reads both keys from the `train:` mapping `r` into c.train; the mode must
// be one of model/recompute.h's names and every listed layer an index of
// c.model (read before). Errors name the key, the value and what is allowed.
void read_recompute(
    config::YamlReader& r, TrainConfig& c, const ModelConfig::KeyNamer& name);

} // namespace moeyard::train
