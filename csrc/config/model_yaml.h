#pragma once
// The model's configuration (model/config.h) read from YAML: a file, a
// string, or the `model:`/`moe:` sections of a larger config. Unknown keys,
// wrong types and values outside their range are errors naming the key path
// and where it was given; the result is validated (ModelConfig::validate).

#include <string>

#include "config/yaml_reader.h"
#include "model/config.h"

namespace moeyard::config {

// A model config at `path` of `node` (keys `model:` fields plus `moe:`).
ModelConfig model_config_from_yaml(
    const YAML::Node& node,
    const std::string& path = "model",
    const std::string& file = "");
ModelConfig model_config_from_yaml_string(const std::string& text);
ModelConfig model_config_from_yaml_file(const std::string& file);

// Readers of the two sections, for configs that hold them at other paths
// (the trainer's top-level `model:` and `moe:`). read_model_field reads one
// key only (e.g. max_seq_len beside model.init_from).
void read_model_fields(YamlReader& r, ModelConfig& c);
void read_model_field(YamlReader& r, ModelConfig& c, const char* key);
void read_moe_config(YamlReader r, MoEConfig& m);

} // namespace moeyard::config
