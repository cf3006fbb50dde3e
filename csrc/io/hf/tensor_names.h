#pragma once
// Names of tensors between the model and a family's files: which TensorRule
// names a model tensor and how a rule's template becomes a file name. Used
// by the checkpoint import/export (hf_checkpoint.cpp) and the LoRA adapter
// export (hf_peft.cpp).

#include <ATen/core/Tensor.h>

#include <string>

#include "io/hf/family.h"

namespace moeyard::io::hf {

// The rule that names a model tensor: "layers.3.attn.q_proj.weight" is
// "{layer}.attn.q_proj.weight" in layer 3; null when the family has none.
const TensorRule* rule_of(
    const HfFamily& fam, const std::string& name, int64_t* layer);

// Replaces every `key` in s by v.
void replace_all(std::string& s, const std::string& key, const std::string& v);

// Where one layer's tensors are: the layer and its MoE block's name.
struct Place {
  int64_t layer = -1;
  std::string moe_block;

  // A rule's file name template filled in ({e}: expert e, when e >= 0).
  std::string name(std::string tmpl, int64_t e = -1) const;
};

// Whether the rule's files hold one tensor per expert ({e} in the name).
bool per_expert(const TensorRule& rule);

// An interleaved rule's files alternate gate and up along `dim` (GPT-OSS);
// moeyard stacks gate then up. interleave: ours -> theirs; deinterleave:
// theirs -> ours.
at::Tensor interleave(const at::Tensor& t, int64_t dim = -1);
at::Tensor deinterleave(const at::Tensor& t, int64_t dim = -1);

} // namespace moeyard::io::hf
