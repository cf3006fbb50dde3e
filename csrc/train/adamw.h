#pragma once
// AdamW (decoupled weight decay) over parameter groups, run by ATen's fused
// kernel (CPU and CUDA) one group, device and dtype at a time. Its step
// counts are tensors on the parameters' device, and a step that must not be
// applied (the trainer's skip guard) is skipped inside the kernel by a
// device flag, and clipping enters as the kernel's gradient divisor: an
// update never waits for a value on the host.

#include <ATen/core/Tensor.h>

#include <map>
#include <vector>

namespace moeyard::train {

struct AdamWGroup {
  std::vector<at::Tensor> params;
  double lr = 1e-3, weight_decay = 0.0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  // Whether the step's gradient divisor (clipping) applies to this group.
  bool clipped = true;
};

// One parameter's state: the moments (the parameter's shape and dtype) and
// the step count (a float32 scalar on its device, whole numbers).
struct AdamWState {
  at::Tensor exp_avg, exp_avg_sq, step;
};

class AdamW {
 public:
  explicit AdamW(std::vector<AdamWGroup> groups) : groups_(std::move(groups)) {}

  std::vector<AdamWGroup>& groups() {
    return groups_;
  }
  const std::vector<AdamWGroup>& groups() const {
    return groups_;
  }
  // The state of `p`: null before its first step (or a load).
  const AdamWState* state(const at::Tensor& p) const;
  // Fresh state of `p` at `step` (zero moments) to fill, e.g. from a
  // checkpoint.
  AdamWState& reset_state(const at::Tensor& p, int64_t step);
  const std::map<const void*, AdamWState>& states() const {
    return states_;
  }

  // One step of every parameter that has a gradient. `skip`: a float32
  // scalar on the parameters' device, 1 leaves parameters, moments and step
  // counts as they are. `grad_divisor` (undefined: none): a float32 scalar
  // the gradients of the clipped groups are divided by.
  void step(const at::Tensor& skip, const at::Tensor& grad_divisor);

 private:
  std::vector<AdamWGroup> groups_;
  std::map<const void*, AdamWState> states_; // by TensorImpl
};

} // namespace moeyard::train
