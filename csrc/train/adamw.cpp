#include "train/adamw.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <tuple>

namespace moeyard::train {

const AdamWState* AdamW::state(const at::Tensor& p) const {
  const auto it = states_.find(p.unsafeGetTensorImpl());
  return it == states_.end() ? nullptr : &it->second;
}

AdamWState& AdamW::reset_state(const at::Tensor& p, int64_t step) {
  auto& s = states_[p.unsafeGetTensorImpl()];
  s.exp_avg = at::zeros_like(p, at::MemoryFormat::Contiguous);
  s.exp_avg_sq = at::zeros_like(p, at::MemoryFormat::Contiguous);
  s.step =
      at::full({}, static_cast<double>(step), p.options().dtype(at::kFloat));
  return s;
}

void AdamW::step(const at::Tensor& skip, const at::Tensor& grad_divisor) {
  at::NoGradGuard no_grad;
  // The step counts advance by 1 - skip; the kernel returns at once where
  // skip is 1.
  const auto advance = 1 - skip;
  for (const auto& g : groups_) {
    struct Lists {
      std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs, steps;
    };
    std::map<std::tuple<int, int, at::ScalarType>, Lists> by_kind;
    for (const auto& p : g.params) {
      if (!p.grad().defined()) {
        continue;
      }
      const auto it = states_.find(p.unsafeGetTensorImpl());
      auto& st = it != states_.end() ? it->second : reset_state(p, 0);
      auto& l = by_kind[{
          static_cast<int>(p.device().type()),
          p.device().index(),
          p.scalar_type()}];
      l.params.push_back(p);
      l.grads.push_back(p.grad().contiguous());
      l.exp_avgs.push_back(st.exp_avg);
      l.exp_avg_sqs.push_back(st.exp_avg_sq);
      l.steps.push_back(st.step);
    }
    for (auto& [kind, l] : by_kind) {
      at::_foreach_add_(l.steps, advance);
      std::optional<at::Tensor> divisor;
      if (g.clipped && grad_divisor.defined()) {
        divisor = grad_divisor;
      }
      at::_fused_adamw_(
          l.params,
          l.grads,
          l.exp_avgs,
          l.exp_avg_sqs,
          {},
          l.steps,
          g.lr,
          g.beta1,
          g.beta2,
          g.weight_decay,
          g.eps,
          /*amsgrad=*/false,
          /*maximize=*/false,
          divisor,
          skip);
    }
  }
}

} // namespace moeyard::train
