#pragma once
// A Hugging Face checkpoint family (a config.json model_type): everything
// that differs between families, in one object that both directions read.
// Each family is one file in this folder that builds its HfFamily; the list
// of families is registry.cpp. The shared machinery (config.json keys common
// to all families, the safetensors files, the import and export loops) is in
// csrc/io/hf_*.cpp and reads the family only through this object.

#include <nlohmann/json.hpp>

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "io/hf/json_reader.h"
#include "model/config.h"

namespace moeyard::io::hf {

// One moeyard tensor and where the family's files keep it, read on import
// and written on export. Names are templates: {layer} is "layers.<i>" on
// moeyard's side and "model.layers.<i>" on the files' side; {moe} is the
// layer's MoE block in the files (HfFamily::moe_block; on import, files
// whose router is not under that name use transformers' in-memory "mlp");
// {e} is the expert index.
struct TensorRule {
  std::string ours;
  // One tensor, or two (gate, up) whose rows are concatenated into ours.
  // With {e}: one per expert, stacked into ours [E, ...].
  std::vector<std::string> theirs;
  // Import only: a tensor read instead of `theirs` when the files have it,
  // as it is (transformers' in-memory fused expert tensors).
  std::string fused = "";
  // The files' tensor has gate and up columns alternating in its last dim
  // (moeyard stacks gate then up), and its last two dims swapped (GPT-OSS).
  bool interleaved = false;
  bool transposed = false;
  // Import: the files may lack it (the tensor keeps its value).
  bool optional = false;
  // Export: written as float32 whatever the model's dtype.
  bool float32 = false;
};

// Settings every model of a family has: the importer sets them and the
// exporter refuses a model with other values ("cannot express ...").
struct HfTraits {
  std::string attention = "mha"; // "mla": multi-head latent attention
  std::string qk_norm = "none";
  std::string score_fn = "softmax";
  std::string activation = "swiglu";
  bool router_bias = false;
  bool expert_bias = false;
  bool selection_bias = false;
  bool attention_sinks = false;
  // Settings config.json has a key for: the importer reads the key, the
  // exporter writes it. Without one, export needs moeyard's default.
  bool attention_bias_key = false; // attention_bias
  bool qkv_bias_key = false; // qkv_bias
  bool clip_qkv_key = false; // clip_qkv
  bool rope_interleave_key = false; // rope_interleave
  // Keys the family's read/write functions handle; without them, export
  // needs head_dim == hidden_size / num_heads, no sliding window, and
  // routing without scale or groups.
  bool head_dim_key = false;
  bool window_keys = false;
  bool group_routing_keys = false;
};

// An export check: `ok` or an error "export to <family>: cannot express
// <what>".
using Cannot = std::function<void(bool ok, const std::string& what)>;

struct HfFamily {
  std::string model_type; // config.json's model_type
  std::string architecture; // config.json's architectures on export

  // transformers' config class: the defaults of the keys read (a key absent
  // from config.json takes its class default, as transformers loads it;
  // rope_theta is the class's default_theta) and its attribute_map as
  // (alias, key) pairs. tests/python/test_hf_defaults.py compares them
  // with the installed transformers.
  nlohmann::json defaults;
  std::vector<std::pair<std::string, std::string>> aliases;
  // Defaults the config class computes from other keys (may be null).
  std::function<void(nlohmann::json& hf)> derived_defaults;

  HfTraits traits;
  // config.json -> ModelConfig: the family's own keys, after the common
  // ones (hf_config.cpp) are read.
  std::function<void(const JsonReader& r, ModelConfig& c)> read;
  // ModelConfig -> config.json: the family's own keys and checks, after the
  // common ones (hf_config_export.cpp) are written.
  std::function<void(const ModelConfig& c, nlohmann::json& j, const Cannot&)>
      write;

  // The weights: the MoE block's name in save_pretrained's files and one
  // rule per tensor, used by both import and export.
  std::string moe_block = "mlp";
  std::vector<TensorRule> tensors;
  // The config.json key (if any) counting layers stored after the decoder
  // layers that the causal LM does not use, whose tensors the import skips.
  std::string unused_layers_key = "";
};

// ---- the registry (registry.cpp) --------------------------------------------

// Every family, in the order hf_families() lists them.
const std::vector<HfFamily>& all_families();

// The family of a model_type; an error naming `file` and the supported
// families otherwise.
const HfFamily& family_of(
    const std::string& model_type, const std::string& file);

// config.json as the family's transformers config class sees it: aliases
// renamed to their keys, then the class default under every key that is
// absent. A key present as null stays null: it is the class's None, read
// with the fallback at its use.
nlohmann::json with_class_defaults(
    const nlohmann::json& hf, const HfFamily& family);

// ---- pieces several families share (common.cpp) -----------------------------

// Embeddings, norms, attention and dense MLPs: the same names in every
// family (transformers' Llama-style names).
std::vector<TensorRule> common_tensor_rules();

// The router {moe}.<router>.weight and the selection bias beside it.
std::vector<TensorRule> router_rules(const std::string& router);

// Per-expert 2-D weights {moe}.experts.{e}.<gate|up|down>.weight, also read
// as transformers' fused 3-D {moe}.experts.{gate_up,down}_proj.
std::vector<TensorRule> expert_rules(
    const std::string& gate, const std::string& up, const std::string& down);

// The names most families use: common_tensor_rules(), the router "gate"
// and experts' gate_proj, up_proj and down_proj.
std::vector<TensorRule> default_tensor_rules();

// A shared expert {moe}.<name>.{gate,up,down}_proj.weight.
std::vector<TensorRule> shared_expert_rules(const std::string& name);

// Concatenation of rule lists.
std::vector<TensorRule> join(std::vector<std::vector<TensorRule>> parts);

// The MoE layers of a model: explicit in c.moe.layers unless every layer.
void set_moe_layers(ModelConfig& c, std::vector<int64_t> layers);

// The layers that are not MoE.
std::vector<int64_t> dense_layers(const ModelConfig& c);

// The routed experts' width (moe.ffn_size, else ffn_size).
int64_t expert_ffn_size(const ModelConfig& c);

// Export checks of the families whose every layer is MoE without shared
// experts.
void check_moe_every_layer(const ModelConfig& c, const Cannot& cannot);

} // namespace moeyard::io::hf
