// torch.ops.moeyard.moe_forward: moe_forward (moe_forward.h) as a
// CompositeImplicitAutograd op, so Python calls the same C++ function and
// torch.compile traces through to the moeyard ops underneath.

#include <torch/library.h>

#include "model/moe_forward.h"

namespace moeyard {
namespace {

using Out = std::tuple<
    at::Tensor,
    at::Tensor,
    at::Tensor,
    at::Tensor,
    at::Tensor,
    at::Tensor,
    at::Tensor,
    at::Tensor,
    at::Tensor,
    at::Tensor>;

at::Tensor opt(const std::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

Out moe_forward_op(
    const at::Tensor& x,
    const at::Tensor& router_weight,
    const std::optional<at::Tensor>& router_bias,
    const at::Tensor& w_gate_up,
    const at::Tensor& w_down,
    const std::optional<at::Tensor>& shared_gate_up,
    const std::optional<at::Tensor>& shared_down,
    const std::optional<at::Tensor>& shared_gate,
    const std::optional<at::Tensor>& selection_bias,
    const std::optional<at::Tensor>& noise_weight,
    const std::optional<at::Tensor>& mask,
    int64_t top_k,
    c10::string_view score_fn,
    bool renormalize,
    double scale,
    int64_t num_groups,
    int64_t topk_groups,
    c10::string_view routing,
    bool weight_on_input,
    double capacity_factor,
    int64_t min_capacity,
    c10::string_view drop_policy,
    c10::string_view noise,
    double noise_eps,
    double temperature,
    double expert_dropout,
    int64_t sequence_length,
    bool training,
    const std::optional<at::Tensor>& b_gate_up,
    const std::optional<at::Tensor>& b_down,
    c10::string_view activation,
    double swiglu_alpha,
    double swiglu_limit) {
  MoEWeights w{
      router_weight,
      opt(router_bias),
      w_gate_up,
      w_down,
      opt(shared_gate_up),
      opt(shared_down),
      opt(shared_gate),
      opt(selection_bias),
      opt(noise_weight),
      opt(b_gate_up),
      opt(b_down)};
  MoEOptions o;
  o.top_k = top_k;
  o.score_fn = std::string(score_fn);
  o.renormalize = renormalize;
  o.scale = scale;
  o.num_groups = num_groups;
  o.topk_groups = topk_groups;
  o.routing = std::string(routing);
  o.weight_on_input = weight_on_input;
  o.capacity_factor = capacity_factor;
  o.min_capacity = min_capacity;
  o.drop_policy = std::string(drop_policy);
  o.noise = std::string(noise);
  o.noise_eps = noise_eps;
  o.temperature = temperature;
  o.expert_dropout = expert_dropout;
  o.sequence_length = sequence_length;
  o.training = training;
  o.activation = std::string(activation);
  o.swiglu_alpha = swiglu_alpha;
  o.swiglu_limit = swiglu_limit;
  auto r = moe_forward(x, w, o, opt(mask));
  return {
      r.y,
      r.switch_loss,
      r.importance_loss,
      r.load_loss,
      r.z_loss,
      r.tokens_per_expert,
      r.dropped_fraction,
      r.router_entropy,
      r.capacity_utilization,
      r.indices};
}

} // namespace

TORCH_LIBRARY_FRAGMENT(moeyard, m) {
  m.def(
      "moe_forward(Tensor x, Tensor router_weight, Tensor? router_bias, "
      "Tensor w_gate_up, Tensor w_down, Tensor? shared_gate_up=None, "
      "Tensor? shared_down=None, Tensor? shared_gate=None, "
      "Tensor? selection_bias=None, Tensor? noise_weight=None, "
      "Tensor? mask=None, int top_k=2, str score_fn=\"softmax\", "
      "bool renormalize=True, float scale=1.0, int num_groups=1, "
      "int topk_groups=1, str routing=\"token_choice\", "
      "bool weight_on_input=False, float capacity_factor=0.0, "
      "int min_capacity=1, str drop_policy=\"position\", "
      "str noise=\"none\", float noise_eps=0.01, float temperature=1.0, "
      "float expert_dropout=0.0, int sequence_length=0, "
      "bool training=False, Tensor? b_gate_up=None, Tensor? b_down=None, "
      "str activation=\"swiglu\", float swiglu_alpha=1.702, "
      "float swiglu_limit=7.0) -> (Tensor y, Tensor switch_loss, "
      "Tensor importance_loss, Tensor load_loss, Tensor z_loss, "
      "Tensor tokens_per_expert, Tensor dropped_fraction, "
      "Tensor router_entropy, Tensor capacity_utilization, Tensor indices)");
}

TORCH_LIBRARY_IMPL(moeyard, CompositeImplicitAutograd, m) {
  m.impl("moe_forward", &moe_forward_op);
}

} // namespace moeyard
