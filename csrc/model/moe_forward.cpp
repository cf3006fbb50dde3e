#include "model/moe_forward.h"

#include "model/moe_detail.h"

namespace moeyard {

MoEOutput moe_forward(
    const at::Tensor& x,
    const MoEWeights& w,
    const MoEOptions& o,
    const at::Tensor& mask,
    const at::Tensor& token_ids,
    const at::Tensor& drop_lowest) {
  check_moe_option_values(o, "moe_forward");
  detail::check_weights(x, w, o);
  check_moe_options(o, w.router_weight.size(0) - o.null_experts, "moe_forward");
  const int64_t H = x.size(-1);
  const auto x2 = x.reshape({-1, H});

  const auto router =
      detail::router_logits(x2, mask, token_ids, drop_lowest, w, o);
  const auto plan = detail::routing_plan(router, w, o);
  MoEOutput out;
  out.y = detail::run_experts(x2, plan, router, w, o).view(x.sizes());

  // The per-sequence switch loss's sequences: x's second-to-last dimension.
  const int64_t S = !o.switch_per_sequence ? 0
                    : x.dim() >= 2         ? x.size(-2)
                                           : x2.size(0);
  detail::routing_statistics(router, plan, o, S, out);
  return out;
}

} // namespace moeyard
