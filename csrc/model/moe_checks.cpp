// moe_forward's argument checks: the options against their table rows, the
// weights against x and each other.

#include <c10/util/Exception.h>

#include <sstream>
#include <type_traits>

#include "model/moe_detail.h"
#include "parallel/layout.h"
#include "parallel/process_group.h"

namespace moeyard {

std::vector<std::string> moe_spec::choices_of(const Allowed& a) {
  std::vector<std::string> out;
  std::istringstream s(a.choices ? a.choices : "");
  for (std::string name; s >> name;) {
    out.push_back(name);
  }
  return out;
}

namespace {

std::string joined(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) {
    out += (out.empty() ? "" : ", ") + n;
  }
  return out;
}

// One option against its row: a number in its range, a name in its list.
template <typename T>
void check_allowed(
    const std::string& who,
    const char* name,
    const T& v,
    const moe_spec::Allowed& a) {
  if constexpr (std::is_same_v<T, std::string>) {
    const auto names = moe_spec::choices_of(a);
    for (const auto& n : names) {
      if (v == n) {
        return;
      }
    }
    TORCH_CHECK(
        names.empty(),
        who,
        ": ",
        name,
        " must be one of ",
        joined(names),
        ", got '",
        v,
        "'");
  } else if constexpr (!std::is_same_v<T, bool>) {
    TORCH_CHECK(
        a.range.contains(static_cast<double>(v)),
        who,
        ": ",
        name,
        " must be in ",
        a.range.str(),
        ", got ",
        config::show_number(static_cast<double>(v)));
  }
}

} // namespace

void check_moe_option_values(const MoEOptions& o, const std::string& who) {
  for_each_moe_option(o, [&](const char* name, const auto& v, const auto& a) {
    check_allowed(who, name, v, a);
  });
}

void check_moe_options(
    const MoEOptions& o, int64_t num_experts, const std::string& who) {
  check_moe_option_values(o, who);
  const int64_t E = num_experts, Z = o.null_experts;
  TORCH_CHECK(
      o.top_k >= 1 && o.top_k <= E + Z,
      who,
      ": top_k must be in [1, num_experts",
      Z > 0 ? " + null_experts=" : "=",
      E + Z,
      "], got ",
      o.top_k);
  if (Z > 0) {
    TORCH_CHECK(
        o.routing == "token_choice" || o.routing == "top_p" ||
            o.routing == "threshold",
        who,
        ": null_experts needs routing 'token_choice', 'top_p' or "
        "'threshold', got '",
        o.routing,
        "'");
    TORCH_CHECK(
        o.num_groups == 1,
        who,
        ": null_experts needs num_groups = 1, got ",
        o.num_groups);
    TORCH_CHECK(
        o.null_kind == "zero" || o.null_weights == "keep",
        who,
        ": null_kind 'copy' needs null_weights 'keep' (with 'real' a null "
        "pick's weight is 0)");
  }
  TORCH_CHECK(
      o.skip_ratio == 0 || o.routing != "expert_choice",
      who,
      ": skip_ratio needs a token-choice routing, got 'expert_choice'");
  TORCH_CHECK(
      o.num_groups == 1 || o.routing == "token_choice",
      who,
      ": num_groups > 1 (group-limited top-k) needs routing 'token_choice', "
      "got '",
      o.routing,
      "'");
  TORCH_CHECK(
      o.score_fn == "softmax" || (o.routing != "top_p" && o.routing != "relu"),
      who,
      ": routing '",
      o.routing,
      "' needs score_fn 'softmax', got '",
      o.score_fn,
      "'");
  TORCH_CHECK(
      o.num_groups >= 1 && E % o.num_groups == 0,
      who,
      ": num_groups must be >= 1 and divide num_experts=",
      E,
      ", got ",
      o.num_groups);
  TORCH_CHECK(
      o.topk_groups >= 1 && o.topk_groups <= o.num_groups,
      who,
      ": topk_groups must be in [1, num_groups=",
      o.num_groups,
      "], got ",
      o.topk_groups);
}

namespace detail {

void check_weights(
    const at::Tensor& x, const MoEWeights& w, const MoEOptions& o) {
  TORCH_CHECK(
      x.dim() >= 1, "moe_forward: x must be [..., hidden], got ", x.sizes());
  TORCH_CHECK(
      w.router_weight.defined() && w.router_weight.dim() == 2,
      "moe_forward: router_weight must be [num_experts, hidden]");
  TORCH_CHECK(
      w.w_gate_up.defined() && w.w_down.defined(),
      "moe_forward: w_gate_up and w_down are required");
  const int64_t H = x.size(-1);
  const int64_t E = w.router_weight.size(0) - o.null_experts;
  TORCH_CHECK(
      E >= 1,
      "moe_forward: router_weight must have num_experts + null_experts=",
      o.null_experts,
      " rows with num_experts >= 1, got ",
      w.router_weight.size(0));
  const int64_t ep = o.expert_group ? o.expert_group->size() : 1;
  const int64_t El = parallel::experts_per_rank(E, ep, "moe_forward");
  TORCH_CHECK(
      w.router_weight.size(1) == H,
      "moe_forward: router_weight must be [",
      E + o.null_experts,
      ", ",
      H,
      "] for hidden=",
      H,
      ", got ",
      w.router_weight.sizes());
  TORCH_CHECK(
      w.w_gate_up.dim() == 3 && w.w_gate_up.size(0) == El &&
          w.w_gate_up.size(2) == H && w.w_gate_up.size(1) % 2 == 0,
      "moe_forward: w_gate_up must be [",
      El,
      ", 2F, ",
      H,
      "], got ",
      w.w_gate_up.sizes());
  const int64_t F = w.w_gate_up.size(1) / 2;
  TORCH_CHECK(
      w.w_down.dim() == 3 && w.w_down.size(0) == El && w.w_down.size(1) == H &&
          w.w_down.size(2) == F,
      "moe_forward: w_down must be [",
      El,
      ", ",
      H,
      ", ",
      F,
      "], got ",
      w.w_down.sizes());
  TORCH_CHECK(
      !w.b_gate_up.defined() ||
          (w.b_gate_up.dim() == 2 && w.b_gate_up.size(0) == El &&
           w.b_gate_up.size(1) == 2 * F),
      "moe_forward: b_gate_up must be [",
      El,
      ", ",
      2 * F,
      "], got ",
      w.b_gate_up.sizes());
  TORCH_CHECK(
      !w.b_down.defined() || (w.b_down.dim() == 2 && w.b_down.size(0) == El &&
                              w.b_down.size(1) == H),
      "moe_forward: b_down must be [",
      El,
      ", ",
      H,
      "], got ",
      w.b_down.sizes());
  TORCH_CHECK(
      !w.selection_bias.defined() || o.routing == "token_choice",
      "moe_forward: selection_bias needs routing 'token_choice', got '",
      o.routing,
      "'");
  TORCH_CHECK(
      !(o.training && o.noise == "noisy_topk") || w.noise_weight.defined(),
      "moe_forward: noise 'noisy_topk' needs noise_weight [",
      E + o.null_experts,
      ", ",
      H,
      "]");
}

} // namespace detail
} // namespace moeyard
