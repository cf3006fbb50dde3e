#pragma once
// A LoRA-fine-tuned model's factors as a PEFT adapter directory
// (adapter_config.json + adapter_model.safetensors) for the transformers
// model of its family: `peft.PeftModel.from_pretrained(model, dir)` loads it.
// Attention factors become LoRA on those nn.Linear modules (target_modules);
// dense-MLP factors LoRA on their 2-D weights (target_parameters; a fused
// gate_up pair becomes gate_proj and up_proj pairs sharing A); expert
// factors LoRA on the fused 3-D expert parameters (target_parameters,
// peft's ParamWrapper). docs/checkpoints.md.

#include <string>

#include "model/transformer.h"

namespace moeyard::io {

// Writes the adapter of `model` (which must have LoRA factors) for `family`
// (a model_type) into out_dir. `base_model` is recorded as
// base_model_name_or_path ("" : none). Errors name what the family's
// layout cannot express.
void save_peft(
    const TransformerImpl& model,
    const std::string& family,
    const std::string& out_dir,
    const std::string& base_model = "");

} // namespace moeyard::io
