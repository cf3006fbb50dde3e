// Rotary tables and the attention module (transformer.h): multi-head
// attention (MHA/GQA/MQA, q/k norm, clip_qkv, biases) and multi-head latent
// attention (MLA, DeepSeek-V2/V3), optional attention sinks (GPT-OSS), a
// per-layer sliding window, with and without a KV cache.

#include <ATen/ATen.h>

#include <cmath>
#include <limits>

#include "model/init.h"
#include "model/transformer.h"
#include "ops/linear.h"
#include "util/dtype.h"

namespace moeyard {
namespace {

// YaRN's attention factor for scale s: 0.1 * mscale * ln(s) + 1 (1 if s <= 1).
double yarn_get_mscale(double scale, double mscale) {
  return scale <= 1 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0;
}

// Latent norms of MLA: transformers builds them with eps 1e-6 whatever
// rms_norm_eps says, so the model does the same.
constexpr double kMlaNormEps = 1e-6;

} // namespace

// ---- Rotary ---------------------------------------------------------------

Rotary::Rotary(const ModelConfig& c) : interleave(c.rope_interleave) {
  dim = c.rope_dim();
  if (dim == 0) {
    return;
  }
  const auto opts = at::dtype(at::kDouble);
  const auto exponents = at::arange(0, dim, 2, opts) / dim;
  const auto pos_freqs = at::pow(c.rope_theta, exponents);
  auto inv_freq = 1.0 / pos_freqs;
  auto positions = at::arange(c.max_seq_len, opts);
  double attention_factor = 1.0;
  if (c.rope_scaling == "linear") {
    positions = positions / c.rope_factor;
  } else if (c.rope_scaling == "yarn") {
    // YaRN (Peng et al. 2023): interpolate low frequencies, keep high ones,
    // linear ramp between the correction dims; scale cos/sin.
    const double f = c.rope_factor;
    auto correction_dim = [&](double rotations) {
      return dim *
             std::log(c.rope_original_max_position / (rotations * 2 * M_PI)) /
             (2 * std::log(c.rope_theta));
    };
    double low = correction_dim(c.yarn_beta_fast);
    double high = correction_dim(c.yarn_beta_slow);
    if (c.yarn_truncate) {
      low = std::floor(low);
      high = std::ceil(high);
    }
    low = std::max(low, 0.0);
    high = std::min(high, static_cast<double>(dim - 1));
    if (low == high) {
      high += 0.001;
    }
    const auto ramp =
        ((at::arange(dim / 2, opts) - low) / (high - low)).clamp(0, 1);
    const auto extrapolation = 1.0 - ramp;
    inv_freq =
        (inv_freq / f) * (1.0 - extrapolation) + inv_freq * extrapolation;
    if (c.yarn_attention_factor > 0) {
      attention_factor = c.yarn_attention_factor;
    } else if (c.yarn_mscale > 0 && c.yarn_mscale_all_dim > 0) {
      attention_factor = yarn_get_mscale(f, c.yarn_mscale) /
                         yarn_get_mscale(f, c.yarn_mscale_all_dim);
    } else {
      attention_factor = yarn_get_mscale(f, 1.0);
    }
  }
  const auto freqs = at::outer(positions, inv_freq);
  const auto emb = at::cat({freqs, freqs}, -1);
  cos = (emb.cos() * attention_factor).to(at::kFloat);
  sin = (emb.sin() * attention_factor).to(at::kFloat);
}

at::Tensor Rotary::apply(const at::Tensor& x, int64_t S, int64_t offset) const {
  if (dim == 0) {
    return x;
  }
  TORCH_CHECK(
      offset + S <= cos.size(0),
      "Transformer: sequence length ",
      S,
      " exceeds model.max_seq_len (",
      cos.size(0),
      ")");
  const auto c = cos.narrow(0, offset, S).to(x.scalar_type());
  const auto s = sin.narrow(0, offset, S).to(x.scalar_type());
  const int64_t D = x.size(-1);
  auto rot = x.narrow(-1, 0, dim);
  if (interleave) {
    // Pairs (x0, x1), (x2, x3), ...: gather evens then odds, which turns the
    // pair rotation into the half rotation below (q and k alike, so the
    // dot products are unchanged; the output stays de-interleaved).
    rot = at::cat({rot.slice(-1, 0, dim, 2), rot.slice(-1, 1, dim, 2)}, -1);
  }
  const auto half1 = rot.narrow(-1, 0, dim / 2);
  const auto half2 = rot.narrow(-1, dim / 2, dim / 2);
  const auto rotated = at::cat({-half2, half1}, -1);
  auto out = rot * c + rotated * s;
  if (dim == D) {
    return out;
  }
  return at::cat({out, x.narrow(-1, dim, D - dim)}, -1);
}

// ---- Attention ------------------------------------------------------------

AttentionImpl::AttentionImpl(const ModelConfig& c, int64_t layer)
    : heads(c.num_heads),
      kv_heads(c.is_mla() ? c.num_heads : c.kv_heads()),
      window(c.window_of(layer)),
      head_dim(c.qk_head_dim()),
      v_dim(c.is_mla() ? c.v_head_dim : c.dim_per_head()),
      nope_dim(c.qk_nope_head_dim),
      rope_dim(c.qk_rope_head_dim),
      kv_rank(c.kv_lora_rank),
      clip(c.clip_qkv),
      qk_norm(c.qk_norm),
      mla(c.is_mla()) {
  const auto dt = parse_dtype(c.dtype);
  const int64_t H = c.hidden_size;
  const bool ab = c.attention_bias;
  if (mla) {
    // DeepSeek-V2/V3: q through a low-rank bottleneck (or plain q_proj), k
    // and v from one compressed latent plus a rotary key shared by heads.
    if (c.q_lora_rank > 0) {
      q_a_proj = register_module("q_a_proj", Linear(H, c.q_lora_rank, ab, dt));
      q_a_norm = register_module(
          "q_a_norm", Norm(c.q_lora_rank, "rmsnorm", kMlaNormEps, dt));
      q_b_proj = register_module(
          "q_b_proj", Linear(c.q_lora_rank, heads * head_dim, false, dt));
    } else {
      q_proj =
          register_module("q_proj", Linear(H, heads * head_dim, false, dt));
    }
    kv_a_proj =
        register_module("kv_a_proj", Linear(H, kv_rank + rope_dim, ab, dt));
    kv_a_norm =
        register_module("kv_a_norm", Norm(kv_rank, "rmsnorm", kMlaNormEps, dt));
    kv_b_proj = register_module(
        "kv_b_proj", Linear(kv_rank, heads * (nope_dim + v_dim), false, dt));
  } else {
    const bool qkv_b = c.qkv_bias || ab;
    q_proj = register_module("q_proj", Linear(H, heads * head_dim, qkv_b, dt));
    k_proj =
        register_module("k_proj", Linear(H, kv_heads * head_dim, qkv_b, dt));
    v_proj =
        register_module("v_proj", Linear(H, kv_heads * head_dim, qkv_b, dt));
  }
  o_proj = register_module("o_proj", Linear(heads * v_dim, H, ab, dt));
  if (qk_norm == "head") {
    q_norm =
        register_module("q_norm", Norm(head_dim, "rmsnorm", c.norm_eps, dt));
    k_norm =
        register_module("k_norm", Norm(head_dim, "rmsnorm", c.norm_eps, dt));
  } else if (qk_norm == "projection") {
    q_norm = register_module(
        "q_norm", Norm(heads * head_dim, "rmsnorm", c.norm_eps, dt));
    k_norm = register_module(
        "k_norm", Norm(kv_heads * head_dim, "rmsnorm", c.norm_eps, dt));
  }
  if (c.attention_sinks) {
    sinks = register_parameter("sinks", at::zeros({heads}, param_options(dt)));
  }
  if (c.attention_scale > 0) {
    scale = c.attention_scale;
  } else {
    scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
    if (mla && c.rope_scaling != "none" && c.yarn_mscale_all_dim > 0) {
      // DeepSeek: the softmax scale carries YaRN's mscale twice.
      const double m = yarn_get_mscale(c.rope_factor, c.yarn_mscale_all_dim);
      scale *= m * m;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> AttentionImpl::project(
    const at::Tensor& x, const Rotary& rotary, int64_t offset) const {
  const int64_t B = x.size(0), S = x.size(1);
  if (mla) {
    auto q = q_proj
                 ? q_proj->forward(x)
                 : q_b_proj->forward(q_a_norm->forward(q_a_proj->forward(x)));
    q = q.view({B, S, heads, head_dim}).transpose(1, 2);
    const auto q_rope =
        rotary.apply(q.narrow(-1, nope_dim, rope_dim), S, offset);
    q = at::cat({q.narrow(-1, 0, nope_dim), q_rope}, -1);
    const auto latent = kv_a_proj->forward(x); // [B, S, rank + rope]
    const auto kv =
        kv_b_proj->forward(kv_a_norm->forward(latent.narrow(-1, 0, kv_rank)))
            .view({B, S, heads, nope_dim + v_dim})
            .transpose(1, 2);
    // One rotary key per position, shared by every head.
    const auto k_rope =
        rotary
            .apply(
                latent.narrow(-1, kv_rank, rope_dim).view({B, 1, S, rope_dim}),
                S,
                offset)
            .expand({B, heads, S, rope_dim});
    auto k = at::cat({kv.narrow(-1, 0, nope_dim), k_rope}, -1);
    auto v = kv.narrow(-1, nope_dim, v_dim);
    return {q, k, v};
  }
  auto q = q_proj->forward(x);
  auto k = k_proj->forward(x);
  auto v = v_proj->forward(x);
  if (qk_norm == "projection") {
    q = q_norm->forward(q);
    k = k_norm->forward(k);
  }
  if (clip > 0) {
    q = q.clamp(-clip, clip);
    k = k.clamp(-clip, clip);
    v = v.clamp(-clip, clip);
  }
  q = q.view({B, S, heads, head_dim});
  k = k.view({B, S, -1, head_dim});
  v = v.view({B, S, -1, head_dim});
  if (kv_first >= 0) { // replicated kv heads: the one this rank's heads use
    k = k.narrow(2, kv_first, 1);
    v = v.narrow(2, kv_first, 1);
  }
  v = v.transpose(1, 2);
  if (qk_norm == "head") {
    q = q_norm->forward(q);
    k = k_norm->forward(k);
  }
  q = rotary.apply(q.transpose(1, 2), S, offset);
  k = rotary.apply(k.transpose(1, 2), S, offset);
  return {q, k, v};
}

at::Tensor AttentionImpl::attend(
    const at::Tensor& q,
    const at::Tensor& k,
    const at::Tensor& v,
    const at::Tensor& allowed) const {
  if (!sinks.defined()) {
    return at::scaled_dot_product_attention(
        q, k, v, allowed, 0.0, false, scale, kv_heads != heads);
  }
  // Sinks: one learned logit per head joins each softmax denominator and
  // takes its share of the probability mass (it has no value). Written out,
  // since SDPA has no such term; softmax in float32 (float64 stays).
  auto kk = k, vv = v;
  if (kv_heads != heads) {
    kk = k.repeat_interleave(heads / kv_heads, 1);
    vv = v.repeat_interleave(heads / kv_heads, 1);
  }
  const auto cdt = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto logits = (at::matmul(q, kk.transpose(-2, -1)) * scale).to(cdt);
  logits = logits.masked_fill(
      allowed.logical_not(), -std::numeric_limits<double>::infinity());
  const int64_t B = q.size(0), S = q.size(2), P = kk.size(2);
  const auto sink =
      sinks.to(cdt).view({1, heads, 1, 1}).expand({B, heads, S, 1});
  const auto probs = at::cat({logits, sink}, -1).softmax(-1).narrow(-1, 0, P);
  return at::matmul(probs.to(vv.scalar_type()), vv);
}

at::Tensor AttentionImpl::forward(
    const at::Tensor& x,
    const at::Tensor& attn_mask,
    const Rotary& rotary) const {
  auto [q, k, v] = project(tp ? parallel::copy_to_tp(x, *tp) : x, rotary, 0);
  return output(attend(q, k, v, attn_mask));
}

at::Tensor AttentionImpl::output(const at::Tensor& o) const {
  const int64_t B = o.size(0), S = o.size(2);
  const auto flat = o.transpose(1, 2).reshape({B, S, heads * v_dim});
  if (!tp) {
    return o_proj->forward(flat);
  }
  auto y = parallel::reduce_from_tp(o_proj->forward(flat, false), *tp);
  return o_proj->bias.defined() ? y + o_proj->bias : y;
}

void AttentionImpl::shard(
    int64_t rank, int64_t tp_size, const parallel::Group* group) {
  const parallel::TpSplit rows{0, 1}, cols{1, 1};
  if (mla) {
    // Per-head up-projections split by heads; the low-rank down-projections
    // and their norms stay whole (TransformerImpl::tp_partial_grad).
    (q_proj ? q_proj : q_b_proj)->shard(rows, rank, tp_size, true);
    kv_b_proj->shard(rows, rank, tp_size, true);
  } else if (kv_heads % tp_size == 0) {
    q_proj->shard(rows, rank, tp_size, true);
    k_proj->shard(rows, rank, tp_size, true);
    v_proj->shard(rows, rank, tp_size, true);
  } else {
    // Fewer kv heads than ranks (tp a multiple of kv_heads): k/v stay whole
    // on every rank (partial gradients, TransformerImpl::tp_partial_grad)
    // and each rank keeps the kv head of its query heads.
    q_proj->shard(rows, rank, tp_size, true);
    kv_first = rank * (heads / tp_size) / (heads / kv_heads);
  }
  o_proj->shard(cols, rank, tp_size, false); // bias added after the sum
  if (qk_norm == "projection") {
    q_norm->shard(rank, tp_size, group);
    if (kv_first < 0) {
      k_norm->shard(rank, tp_size, group);
    }
  }
  if (sinks.defined()) {
    sinks = parallel::tp_slice(sinks.detach(), rows, rank, tp_size)
                .clone()
                .requires_grad_(sinks.requires_grad());
    parameters_["sinks"] = sinks;
  }
  heads /= tp_size;
  kv_heads = kv_first >= 0 ? 1 : kv_heads / tp_size;
  tp = group;
}

at::Tensor AttentionImpl::forward_cached(
    const at::Tensor& x, KVCache& cache, const Rotary& rotary) const {
  const int64_t S = x.size(1), P = cache.length();
  auto [q, k, v] = project(tp ? parallel::copy_to_tp(x, *tp) : x, rotary, P);
  cache.k = P == 0 ? k : at::cat({cache.k, k}, 2);
  cache.v = P == 0 ? v : at::cat({cache.v, v}, 2);
  // New query i sits at position P + i: it sees keys j <= P + i (window).
  const auto opts = x.options().dtype(at::kLong);
  const auto i = at::arange(P, P + S, opts).unsqueeze(1);
  const auto j = at::arange(P + S, opts).unsqueeze(0);
  auto allowed = j <= i;
  if (window > 0) {
    allowed = allowed & (i - j < window);
  }
  return output(attend(q, cache.k, cache.v, allowed.view({1, 1, S, P + S})));
}

} // namespace moeyard
