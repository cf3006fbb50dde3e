// ModelConfig -> config.json for each Hugging Face family (export); import
// is in hf_config.cpp, the weights in hf_checkpoint.cpp.

#include <algorithm>
#include <map>

#include "io/hf_checkpoint.h"
#include "io/hf_family.h"

namespace moeyard::io {
using json = nlohmann::json;
using detail::Family;
using detail::family_of;
using detail::JsonReader;

json hf_config_of(
    const ModelConfig& c, const std::string& family, const json& base) {
  const Family fam = family_of(family, "export");
  json j = base.is_object() ? base : json::object();
  auto cannot = [&](bool ok, const std::string& what) {
    TORCH_CHECK(ok, "export to ", family, ": cannot express ", what);
  };
  const auto& m = c.moe;
  const auto& r = m.routing;
  const bool ds = fam == Family::kDeepseekV3, gpt = fam == Family::kGptOss;
  cannot(c.mlp == "swiglu", "model.mlp = " + c.mlp);
  cannot(c.norm == "rmsnorm", "model.norm = " + c.norm);
  cannot(
      r.score_fn == (ds ? "sigmoid" : "softmax"),
      "moe.score_fn = " + r.score_fn);
  cannot(ds || r.scale == 1.0, "moe.scale != 1");
  cannot(ds || r.num_groups == 1, "group-limited top-k (moe.num_groups > 1)");
  cannot(r.routing == "token_choice", "moe.routing = " + r.routing);
  cannot(!r.weight_on_input, "moe.weight_on_input");
  cannot(
      m.router_bias == gpt,
      "moe.router_bias = " + std::to_string(m.router_bias));
  cannot(
      m.expert_bias == gpt,
      "moe.expert_bias = " + std::to_string(m.expert_bias));
  cannot(
      r.activation == (gpt ? "clamped_swiglu" : "swiglu"),
      "moe.activation = " + r.activation);
  cannot(
      m.selection_bias == ds,
      "moe.selection_bias = " + std::to_string(m.selection_bias));
  cannot(
      c.attention_sinks == gpt,
      "model.attention_sinks = " + std::to_string(c.attention_sinks));
  cannot(c.is_mla() == ds, "model.attention = " + c.attention);
  cannot(c.rotary_pct == 1.0, "partial rotary (model.rotary_pct < 1)");
  cannot(fam == Family::kOlmoe || c.clip_qkv == 0.0, "model.clip_qkv");
  cannot(ds || !c.rope_interleave, "model.rope_interleave");
  cannot(!c.qkv_bias || fam == Family::kQwen2Moe, "qkv bias");
  cannot(
      !c.attention_bias ||
          (fam == Family::kQwen3Moe || fam == Family::kOlmoe || ds || gpt),
      "model.attention_bias");
  const std::map<Family, std::string> arch = {
      {Family::kMixtral, "MixtralForCausalLM"},
      {Family::kQwen2Moe, "Qwen2MoeForCausalLM"},
      {Family::kQwen3Moe, "Qwen3MoeForCausalLM"},
      {Family::kOlmoe, "OlmoeForCausalLM"},
      {Family::kDeepseekV3, "DeepseekV3ForCausalLM"},
      {Family::kGptOss, "GptOssForCausalLM"}};
  // An alias left in `base` would be read for its key by transformers (and
  // by the importer): the keys written below are the only spelling.
  for (const auto& [alias, key] : detail::class_aliases(fam)) {
    j.erase(alias);
  }
  j["model_type"] = family;
  j["architectures"] = json::array({arch.at(fam)});
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["num_hidden_layers"] = c.num_layers;
  j["num_attention_heads"] = c.num_heads;
  j["num_key_value_heads"] = c.kv_heads();
  j["rms_norm_eps"] = c.norm_eps;
  j["max_position_embeddings"] = c.max_seq_len;
  j["tie_word_embeddings"] = c.tie_embeddings;
  j["hidden_act"] = "silu";
  j["num_experts_per_tok"] = r.top_k;
  j["dtype"] = c.dtype;
  j.erase("torch_dtype");
  if (fam == Family::kMixtral || fam == Family::kQwen3Moe || gpt) {
    j["head_dim"] = c.dim_per_head();
  } else if (!ds) {
    cannot(
        c.dim_per_head() * c.num_heads == c.hidden_size,
        "head_dim != hidden_size / num_heads");
  }
  json rope = {{"rope_theta", c.rope_theta}};
  if (c.rope_scaling == "none") {
    rope["rope_type"] = "default";
  } else {
    rope["rope_type"] = c.rope_scaling;
    rope["factor"] = c.rope_factor;
    if (c.rope_scaling == "yarn") {
      rope["original_max_position_embeddings"] = c.rope_original_max_position;
      rope["beta_fast"] = c.yarn_beta_fast;
      rope["beta_slow"] = c.yarn_beta_slow;
      rope["truncate"] = c.yarn_truncate;
      if (c.yarn_mscale > 0) {
        rope["mscale"] = c.yarn_mscale;
      }
      if (c.yarn_mscale_all_dim > 0) {
        rope["mscale_all_dim"] = c.yarn_mscale_all_dim;
      }
      if (c.yarn_attention_factor > 0) {
        rope["attention_factor"] = c.yarn_attention_factor;
      }
    }
  }
  j.erase("rope_scaling");
  j.erase("rope_theta");
  j["rope_parameters"] = rope;
  const int64_t F = m.ffn_size > 0 ? m.ffn_size : c.ffn_size;
  std::vector<int64_t> dense;
  for (int64_t i = 0; i < c.num_layers; ++i) {
    if (!c.is_moe_layer(i)) {
      dense.push_back(i);
    }
  }
  // Sliding windows: Mixtral's one window, GPT-OSS's per-layer kinds.
  bool any_sliding = false;
  for (int64_t i = 0; i < c.num_layers; ++i) {
    any_sliding |= c.window_of(i) > 0;
  }
  if (gpt) {
    json types = json::array();
    for (int64_t i = 0; i < c.num_layers; ++i) {
      types.push_back(
          c.window_of(i) > 0 ? "sliding_attention" : "full_attention");
    }
    j["layer_types"] = types;
    j["sliding_window"] = c.sliding_window;
  } else if (fam == Family::kMixtral) {
    cannot(c.layer_types.empty(), "per-layer attention kinds");
    j["sliding_window"] =
        c.sliding_window > 0 ? json(c.sliding_window) : json(nullptr);
  } else {
    cannot(!any_sliding, "a sliding window");
    if (fam == Family::kQwen2Moe) {
      j["layer_types"] = json::array();
      for (int64_t i = 0; i < c.num_layers; ++i) {
        j["layer_types"].push_back("full_attention");
      }
    } else {
      j.erase("layer_types");
    }
  }
  switch (fam) {
    case Family::kMixtral:
    case Family::kOlmoe:
    case Family::kGptOss:
      cannot(dense.empty(), "dense layers");
      cannot(m.num_shared_experts == 0, "shared experts");
      cannot(fam == Family::kOlmoe || r.renormalize, "moe.renormalize = false");
      j["intermediate_size"] = F;
      if (fam == Family::kMixtral) {
        cannot(c.qk_norm == "none", "q/k norm");
        j["num_local_experts"] = m.num_experts;
        j["router_jitter_noise"] = r.noise == "jitter" ? r.noise_eps : 0.0;
      } else if (fam == Family::kOlmoe) {
        cannot(c.qk_norm == "projection", "q/k norm other than projection");
        j["num_experts"] = m.num_experts;
        j["norm_topk_prob"] = r.renormalize;
        j["attention_bias"] = c.attention_bias;
        j["clip_qkv"] = c.clip_qkv > 0 ? json(c.clip_qkv) : json(nullptr);
      } else {
        cannot(c.qk_norm == "none", "q/k norm");
        cannot(c.attention_bias, "attention without biases");
        j["num_local_experts"] = m.num_experts;
        j["attention_bias"] = true;
        j["swiglu_alpha"] = r.swiglu_alpha;
        j["swiglu_limit"] = r.swiglu_limit;
      }
      break;
    case Family::kQwen2Moe:
    case Family::kQwen3Moe:
      j["num_experts"] = m.num_experts;
      j["moe_intermediate_size"] = F;
      j["intermediate_size"] =
          c.dense_ffn_size > 0 ? c.dense_ffn_size : c.ffn_size;
      j["norm_topk_prob"] = r.renormalize;
      j["decoder_sparse_step"] = 1;
      j["mlp_only_layers"] = dense;
      j["use_sliding_window"] = false;
      if (fam == Family::kQwen2Moe) {
        cannot(c.qk_norm == "none", "q/k norm");
        cannot(
            m.num_shared_experts <= 1 &&
                (m.num_shared_experts == 0 || m.shared_gate),
            "shared experts other than one with a sigmoid gate");
        j["qkv_bias"] = c.qkv_bias;
        j["shared_expert_intermediate_size"] =
            m.num_shared_experts > 0
                ? (m.shared_ffn_size > 0 ? m.shared_ffn_size : F)
                : 0;
      } else {
        cannot(c.qk_norm == "head", "q/k norm other than per head");
        cannot(m.num_shared_experts == 0, "shared experts");
        j["attention_bias"] = c.attention_bias;
      }
      break;
    case Family::kDeepseekV3: {
      cannot(!m.shared_gate, "a gated shared expert");
      cannot(
          m.num_shared_experts == 0 || m.shared_ffn_size == 0 ||
              m.shared_ffn_size == F,
          "shared experts narrower or wider than the routed ones");
      // Dense layers must be exactly the first k (moe_every_n = 1).
      for (size_t k = 0; k < dense.size(); ++k) {
        cannot(
            dense[k] == static_cast<int64_t>(k),
            "dense layers other than the first k");
      }
      j["n_routed_experts"] = m.num_experts;
      j["moe_intermediate_size"] = F;
      j["intermediate_size"] =
          c.dense_ffn_size > 0 ? c.dense_ffn_size : c.ffn_size;
      j["first_k_dense_replace"] = dense.size();
      j["n_shared_experts"] = m.num_shared_experts;
      j["routed_scaling_factor"] = r.scale;
      j["n_group"] = r.num_groups;
      j["topk_group"] = r.topk_groups;
      j["norm_topk_prob"] = r.renormalize;
      j["q_lora_rank"] =
          c.q_lora_rank > 0 ? json(c.q_lora_rank) : json(nullptr);
      j["kv_lora_rank"] = c.kv_lora_rank;
      j["qk_nope_head_dim"] = c.qk_nope_head_dim;
      j["qk_rope_head_dim"] = c.qk_rope_head_dim;
      j["qk_head_dim"] = c.qk_nope_head_dim + c.qk_rope_head_dim;
      j["head_dim"] = c.qk_rope_head_dim;
      j["v_head_dim"] = c.v_head_dim;
      j["attention_bias"] = c.attention_bias;
      j["rope_interleave"] = c.rope_interleave;
      j["num_key_value_heads"] = c.num_heads;
      // The export carries no multi-token-prediction layers (absent, the
      // key would mean DeepseekV3Config's 1).
      j["num_nextn_predict_layers"] = 0;
      cannot(c.attention_scale == 0.0, "an explicit model.attention_scale");
      break;
    }
  }
  return j;
}

} // namespace moeyard::io
