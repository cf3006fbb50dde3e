#pragma once
// The trainer's `finetune:` section: `finetune.lora` (model/lora.h's
// LoraOptions). Absent or null: no LoRA (the keys are not recorded, so that
// runs without it resume as before).

#include "config/yaml_reader.h"
#include "model/lora.h"

namespace moeyard::config {

// Reads `finetune:` (r) into o; errors name the key, its value and what was
// expected (targets: lora_target_names(); base_dtype: model or a dtype
// name).
void read_finetune(YamlReader r, LoraOptions& o);

} // namespace moeyard::config
