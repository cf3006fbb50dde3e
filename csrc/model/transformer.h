#pragma once
// The decoder-only MoE Transformer as torch::nn modules. The single source of
// truth for the model: the trainer, the Python bindings and the checkpoint
// importers all build this. Parameter names are stable (docs/model.md):
//   embed.weight, layers.{i}.attn_norm.*, layers.{i}.attn.{q,k,v,o}_proj.*,
//   layers.{i}.attn.{q,k}_norm.weight,
//   MLA: layers.{i}.attn.{q_a_proj,q_a_norm,q_b_proj | q_proj,kv_a_proj,
//   kv_a_norm,kv_b_proj,o_proj}.*, layers.{i}.attn.sinks (attention_sinks),
//   layers.{i}.mlp_norm.*,
//   layers.{i}.mlp.{gate_up,up,down}.weight (dense layers),
//   layers.{i}.moe.{router.weight,router.bias,w_gate_up,w_down,
//   b_gate_up,b_down,shared_gate_up,shared_down,shared_gate,noise_weight}
//   and the buffer layers.{i}.moe.selection_bias (MoE layers), norm.*,
//   lm_head.weight.

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "model/config.h"
#include "model/moe_forward.h"
#include "model/recompute.h"
#include "parallel/layout.h"
#include "parallel/tensor_parallel.h"

namespace moeyard {

// The MoE layer's expert parameters (layers.{i}.moe.<name>): one slice per
// expert along dim 0, split over the expert-parallel ranks: the expert
// weight matrices first (kExpertWeights of them), then their biases, then
// their LoRA factors (model/lora.h).
inline constexpr std::array<const char*, 8> kExpertParameters = {
    "w_gate_up",
    "w_down",
    "b_gate_up",
    "b_down",
    "lora_gate_up_a",
    "lora_gate_up_b",
    "lora_down_a",
    "lora_down_b"};
inline constexpr size_t kExpertWeights = 2;
// Whether the model parameter `name` ("layers.1.moe.w_down") is an expert
// parameter; `weights_only`: an expert weight matrix (not a bias).
bool is_expert_parameter(const std::string& name, bool weights_only = false);

// y = x W^T (+ b) with W [out, in].
class LinearImpl : public torch::nn::Module {
 public:
  LinearImpl(int64_t in, int64_t out, bool bias, at::ScalarType dtype);
  // x W^T (+ bias unless `add_bias` is false: a row-parallel piece's bias
  // is added after the sum) + the LoRA update.
  at::Tensor forward(const at::Tensor& x, bool add_bias = true) const;
  // Keeps rank's piece of the weight (and of the bias when `bias_too`), and
  // of the LoRA factors: B's rows when the weight's rows split, A's columns
  // when its columns split (TransformerImpl::tp_split).
  void shard(
      const parallel::TpSplit& split, int64_t rank, int64_t tp, bool bias_too);
  // LoRA (model/lora.h): registers lora_a [r, in] and lora_b [out, r];
  // forward adds scale * B A dropout(x). The frozen weight is kept in
  // base_dtype (cast to x's dtype when used).
  void add_lora(
      int64_t rank, double scale, double dropout, at::ScalarType base_dtype);
  at::Tensor weight, bias;
  at::Tensor lora_a, lora_b;
  double lora_scale = 0.0, lora_dropout = 0.0;
};
TORCH_MODULE(Linear);

// RMSNorm (float32 math, HF convention) or LayerNorm.
class NormImpl : public torch::nn::Module {
 public:
  NormImpl(
      int64_t dim, const std::string& kind, double eps, at::ScalarType dtype);
  at::Tensor forward(const at::Tensor& x) const;
  // Keeps rank's features of an RMSNorm over split features.
  void shard(int64_t rank, int64_t tp, const parallel::Group* group);
  at::Tensor weight, bias;
  bool layernorm;
  double eps;
  // Tensor parallelism: an RMSNorm over features split across `tp` (a
  // projection's q/k norm) sums the squares over the group; `full_dim` is
  // the unsplit width.
  const parallel::Group* tp = nullptr;
  int64_t full_dim = 0;
};
TORCH_MODULE(Norm);

// cos/sin tables of rotary embeddings: full or partial rotary dims, linear
// position scaling or YaRN (frequency ramp + attention factor), pairs laid
// out as halves or interleaved.
struct Rotary {
  explicit Rotary(const ModelConfig& c);
  // Applies the rotation to the first `dim` features of x [B, heads, S, D]
  // at positions [offset, offset + S). Interleaved pairs come out
  // de-interleaved (evens, then odds), the same for q and k.
  at::Tensor apply(
      const at::Tensor& x, int64_t seq_len, int64_t offset = 0) const;
  int64_t dim = 0;
  bool interleave = false;
  at::Tensor cos, sin; // [max_seq_len, dim] float32
};

// Keys and values of the positions seen so far ([B, kv_heads, P, D]).
struct KVCache {
  at::Tensor k, v;
  int64_t length() const {
    return k.defined() ? k.size(2) : 0;
  }
};

// Attention of one layer (csrc/model/attention.cpp): multi-head attention
// with GQA/MQA, q/k norm, clip_qkv and biases, or multi-head latent
// attention (MLA); optional sinks; the layer's sliding window.
class AttentionImpl : public torch::nn::Module {
 public:
  AttentionImpl(const ModelConfig& c, int64_t layer = 0);
  // x [B, S, H]; attn_mask [B, 1, S, S] bool (true = may attend).
  at::Tensor forward(
      const at::Tensor& x,
      const at::Tensor& attn_mask,
      const Rotary& rotary) const;
  // Incremental decoding: x holds the new positions, appended to `cache`.
  at::Tensor forward_cached(
      const at::Tensor& x, KVCache& cache, const Rotary& rotary) const;
  // q [B, heads, S, head_dim], k [B, kv_heads, S, head_dim], v [B,
  // kv_heads, S, v_dim] of positions [offset, offset + S), rotary applied.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> project(
      const at::Tensor& x, const Rotary& rotary, int64_t offset) const;
  // softmax(q k^T * scale (+ sink)) v over the allowed keys.
  at::Tensor attend(
      const at::Tensor& q,
      const at::Tensor& k,
      const at::Tensor& v,
      const at::Tensor& allowed) const;
  // o_proj of the heads' outputs o [B, heads, S, v_dim]; row-parallel
  // (partial sums reduced, then the bias) under tensor parallelism.
  at::Tensor output(const at::Tensor& o) const;
  // Tensor parallelism: keeps heads [rank * heads / tp, ...) and their kv
  // heads (q/k/v, or MLA's q/q_b and kv_b, column-parallel; o_proj
  // row-parallel).
  void shard(int64_t rank, int64_t tp, const parallel::Group* group);
  Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
  Linear q_a_proj{nullptr}, q_b_proj{nullptr}, kv_a_proj{nullptr},
      kv_b_proj{nullptr}; // MLA
  Norm q_norm{nullptr}, k_norm{nullptr}, q_a_norm{nullptr}, kv_a_norm{nullptr};
  at::Tensor sinks; // [heads] (attention_sinks)
  int64_t heads, kv_heads, window; // heads of this rank (tensor parallel)
  int64_t head_dim; // q/k width per head (MLA: nope + rope)
  int64_t v_dim; // value width per head
  int64_t nope_dim, rope_dim, kv_rank; // MLA
  double clip, scale = 1.0;
  std::string qk_norm;
  bool mla;
  const parallel::Group* tp = nullptr;
  // Tensor parallelism with fewer kv heads than ranks: k/v projections stay
  // whole and this rank uses kv head kv_first (-1: kv heads are split).
  int64_t kv_first = -1;
};
TORCH_MODULE(Attention);

// Dense SwiGLU or GELU MLP.
class MlpImpl : public torch::nn::Module {
 public:
  MlpImpl(
      int64_t hidden,
      int64_t ffn,
      const std::string& kind,
      at::ScalarType dtype);
  at::Tensor forward(const at::Tensor& x) const;
  // Tensor parallelism: keeps hidden units [rank * F / tp, ...) (gate_up or
  // up column-parallel, down row-parallel).
  void shard(int64_t rank, int64_t tp, const parallel::Group* group);
  Linear gate_up{nullptr}, up{nullptr}, down{nullptr};
  const parallel::Group* tp = nullptr;
};
TORCH_MODULE(Mlp);

// The MoE layer: parameters, with the math in moe_forward.
class MoELayerImpl : public torch::nn::Module {
 public:
  MoELayerImpl(const ModelConfig& c);
  // With a critic (at evaluation, or in training with skip_in_training),
  // tokens predicted below its threshold skip their lowest pick.
  MoEOutput forward(
      const at::Tensor& x,
      const at::Tensor& mask,
      const at::Tensor& token_ids = {}) const;
  // The routing critic's prediction for x [..., H] (detached): [...]
  // float32, the loss increase if the token's lowest-weight pick is
  // skipped.
  at::Tensor critic(const at::Tensor& x) const;
  // Aux-loss-free balancing of the real experts: bias += rate *
  // sign(mean_load - load_e), times `gate` where given (a 0/1 scalar on
  // the bias's device: the trainer's skip guard, never read on the host).
  void update_selection_bias(
      const at::Tensor& tokens_per_expert,
      double rate,
      const at::Tensor& gate = {});
  // Null-fraction controller: the null experts' selection bias moves by
  // rate * sign(target - their share of tokens_per_expert [E + Z]), times
  // `gate` where given.
  void update_null_bias(
      const at::Tensor& tokens_per_expert,
      double target,
      double rate,
      const at::Tensor& gate = {});
  // Expert parallelism: keeps this rank's experts (layout.first_expert) of
  // the expert parameters (same names, sliced) and routes rows through the
  // layout's expert-parallel group (not owned).
  void shard_experts(const parallel::Layout& layout);
  // LoRA of every expert (model/lora.h): lora_gate_up_a [E, r, H],
  // lora_gate_up_b [E, 2F, r], lora_down_a [E, r, F], lora_down_b [E, H, r];
  // w_gate_up/w_down are frozen and kept in base_dtype.
  void add_lora(
      int64_t rank, double scale, double dropout, at::ScalarType base_dtype);
  MoEWeights weights() const;
  Linear router{nullptr};
  at::Tensor w_gate_up, w_down, shared_gate_up, shared_down, shared_gate,
      selection_bias, noise_weight, b_gate_up, b_down;
  at::Tensor lora_gate_up_a, lora_gate_up_b, lora_down_a, lora_down_b;
  double lora_scale = 0.0, lora_dropout = 0.0;
  // The routing critic (moe.critic_hidden > 0): float32 [c, H], [c], [1, c],
  // [1]; critic_threshold, a buffer [1]: skip where the prediction is below
  // it (-inf: never; set by the trainer for critic.skip_budget).
  at::Tensor critic_w1, critic_b1, critic_w2, critic_b2, critic_threshold;
  MoEOptions options;
  // Per forward, set by the trainer: skip every token's lowest pick (the
  // critic's targets); use the critic threshold in training mode too; keep
  // the input (detached) in captured_input.
  bool drop_all_lowest = false, critic_in_training = false,
       capture_input = false;
  mutable at::Tensor captured_input;
};
TORCH_MODULE(MoELayer);

// The tokens a block's MoE layer routes: the real-token mask and the token
// ids (hash routing), each [B, S] or undefined.
struct Tokens {
  at::Tensor mask, ids;
};

class BlockImpl : public torch::nn::Module {
 public:
  BlockImpl(const ModelConfig& c, int64_t index);
  // Returns the block output; fills `moe_out` for MoE blocks. With grad
  // enabled, the part `recompute` names is recomputed in backward.
  at::Tensor forward(
      const at::Tensor& x,
      const at::Tensor& attn_mask,
      const Tokens& tokens,
      const Rotary& rotary,
      std::optional<MoEOutput>& moe_out) const;
  // forward with the part `mode` names recomputed (none: an ordinary run).
  at::Tensor forward_with(
      const at::Tensor& x,
      const at::Tensor& attn_mask,
      const Tokens& tokens,
      const Rotary& rotary,
      std::optional<MoEOutput>& moe_out,
      Recompute mode) const;
  // The two sub-blocks before their residual adds: attention of
  // attn_norm(x); the MoE layer (filling moe_out) or dense MLP of
  // mlp_norm(h).
  at::Tensor attention_part(
      const at::Tensor& x,
      const at::Tensor& attn_mask,
      const Rotary& rotary) const;
  at::Tensor ffn_part(
      const at::Tensor& h,
      const Tokens& tokens,
      std::optional<MoEOutput>& moe_out) const;
  // Incremental decoding step (no padding) of the tokens `ids`.
  at::Tensor forward_cached(
      const at::Tensor& x,
      const at::Tensor& ids,
      KVCache& cache,
      const Rotary& rotary) const;
  Norm attn_norm{nullptr}, mlp_norm{nullptr};
  Attention attn{nullptr};
  Mlp mlp{nullptr};
  MoELayer moe{nullptr};
  Recompute recompute = Recompute::none; // Transformer::set_recompute
};
TORCH_MODULE(Block);

struct LayerStats {
  int64_t layer;
  MoEOutput moe; // aux losses and routing statistics of that layer
};

struct TransformerOutput {
  at::Tensor logits; // [B, S, V] float32
  std::vector<LayerStats> moe_layers;
};

struct LossOutput {
  at::Tensor loss; // ce + weighted aux terms
  at::Tensor ce; // next-token cross-entropy over real tokens
  at::Tensor aux; // weighted sum of aux losses over MoE layers
  at::Tensor tokens; // number of predicted (real, unmasked) tokens
  at::Tensor keep; // [B * (S - 1)] bool: the predicted positions counted
  TransformerOutput out;
};

class TransformerImpl : public torch::nn::Module {
 public:
  explicit TransformerImpl(ModelConfig c);
  // tokens [B, S] int64; mask [B, S] (nonzero = real token) or undefined.
  TransformerOutput forward(
      const at::Tensor& tokens, const at::Tensor& mask = {});
  // Next-token loss: predicts tokens[:, 1:] from tokens[:, :-1]; positions
  // whose target is padding, or 0 in loss_mask [B, S] (e.g. a chat's
  // prompt: trained on the answers only, attending to everything), are
  // excluded (a loss_mask leaving none: a loss of 0); plus the weighted aux
  // losses.
  LossOutput loss(
      const at::Tensor& tokens,
      const at::Tensor& mask = {},
      const at::Tensor& loss_mask = {});
  // Logits [B, s, V] of the new tokens [B, s], using and extending the
  // per-layer caches (decoding with a KV cache).
  at::Tensor forward_cached(
      const at::Tensor& tokens, std::vector<KVCache>& caches);
  // Samples up to max_new tokens after `prompt` (1-D int64). temperature 0
  // is greedy; top_p < 1 keeps the smallest set of tokens with that mass.
  // use_cache=false recomputes the whole prefix each step (for tests).
  // Sampling stops after a token of stop_tokens (it is returned).
  std::vector<int64_t> generate(
      const std::vector<int64_t>& prompt,
      int64_t max_new,
      double temperature,
      double top_p,
      uint64_t seed,
      bool use_cache = true,
      const std::vector<int64_t>& stop_tokens = {}); // sampled one ends it
  // Resets parameters (normal(0, std) for matrices, ones for norms).
  void init_weights(double std = 0.02);
  // Tensor parallelism (Megatron layout, docs/distributed.md): keeps this
  // rank's heads, dense-MLP hidden units and vocabulary rows under the same
  // parameter names; experts stay whole (computed alike on every TP rank).
  // Errors name the sizes that do not divide by tp.
  void shard_tensor_parallel(
      int64_t rank, int64_t tp, const parallel::Group* group);
  // This rank's pieces under `layout`: tensor parallelism, then expert
  // parallelism (the layout's groups, not owned, must outlive the model).
  void shard(const parallel::Layout& layout);
  // Activation recompute (model/recompute.h) of the blocks `layers` (empty:
  // every block); the others recompute nothing. Errors name a layer index
  // outside [0, num_layers).
  void set_recompute(Recompute mode, const std::vector<int64_t>& layers = {});
  // How parameter `name` splits over the TP group (replicated: dim -1).
  parallel::TpSplit tp_split(const std::string& name) const;
  // A replicated parameter used inside a TP-split computation (per-head q/k
  // norms; MLA's low-rank q/kv down-projections and their norms): each
  // rank's gradient is a partial sum, all-reduced over TP.
  bool tp_partial_grad(const std::string& name) const;

  ModelConfig config;
  Linear embed{nullptr}, lm_head{nullptr};
  torch::nn::ModuleList layers{nullptr};
  Norm norm{nullptr};
  Rotary rotary;
  const parallel::Group* tp = nullptr; // tensor-parallel group (not owned)
  int64_t tp_size = 1;

 private:
  // Embedding lookup (vocabulary-parallel under TP).
  at::Tensor embed_tokens(const at::Tensor& tokens) const;
  // The final hidden states [B, S, H] (normed); fills out.moe_layers.
  at::Tensor hidden(
      const at::Tensor& tokens, const at::Tensor& mask, TransformerOutput& out);
  // Logits in float32 (float64 stays): this rank's vocabulary columns
  // under TP, all of them otherwise.
  at::Tensor local_logits(const at::Tensor& x) const;
};
TORCH_MODULE(Transformer);

} // namespace moeyard
