// recompute_segment: an autograd node that keeps a segment's inputs and the
// random state, and in backward runs the segment again to backpropagate.

#include "model/recompute.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <mutex>
#include <optional>
#include <sstream>

namespace moeyard {

Recompute parse_recompute(const std::string& name, const std::string& who) {
  std::istringstream names(kRecomputeModes);
  std::string n;
  for (int i = 0; names >> n; ++i) {
    if (n == name) {
      return static_cast<Recompute>(i);
    }
  }
  std::string list = kRecomputeModes;
  for (size_t i = list.find(' '); i != std::string::npos;
       i = list.find(' ', i + 2)) {
    list.replace(i, 1, ", ");
  }
  TORCH_CHECK(false, who, " must be one of ", list, ", got '", name, "'");
}

std::string recompute_name(Recompute mode) {
  std::istringstream names(kRecomputeModes);
  std::string n;
  for (int i = 0; names >> n; ++i) {
    if (i == static_cast<int>(mode)) {
      return n;
    }
  }
  TORCH_INTERNAL_ASSERT(false, "recompute_name: bad mode");
}

namespace {

using torch::autograd::variable_list;

// The default generators a segment on `device` draws from: the CPU one, and
// the device's own for CUDA tensors.
struct RngState {
  at::Tensor cpu, device_state;
  std::optional<c10::Device> device;

  static at::Generator generator(const c10::Device& d) {
    return d.is_cpu() ? at::detail::getDefaultCPUGenerator()
                      : at::globalContext().defaultGenerator(d);
  }
  static at::Tensor get(at::Generator g) {
    std::lock_guard<std::mutex> lock(g.mutex());
    return g.get_state();
  }
  static void set(at::Generator g, const at::Tensor& s) {
    std::lock_guard<std::mutex> lock(g.mutex());
    g.set_state(s);
  }

  static RngState capture(const c10::Device& d) {
    RngState r;
    r.cpu = get(generator(c10::Device(c10::kCPU)));
    if (d.is_cuda()) {
      r.device = d;
      r.device_state = get(generator(d));
    }
    return r;
  }
  void restore() const {
    set(generator(c10::Device(c10::kCPU)), cpu);
    if (device) {
      set(generator(*device), device_state);
    }
  }
};

// Backward of a recomputed segment. Its next edges are the segment's inputs,
// then its parameters; its inputs are the gradients of the outputs that went
// through it (`returned`, indices into fn's outputs).
struct RecomputeBackward : public torch::autograd::Node {
  using Node::Node;

  variable_list apply(variable_list&& grads) override {
    TORCH_CHECK(
        fn, "recompute: backward ran twice (retain_graph is not supported)");
    std::vector<at::Tensor> inputs;
    for (const auto& s : saved) {
      auto x = s.unpack();
      inputs.push_back(
          x.defined() ? x.detach().requires_grad_(x.requires_grad()) : x);
    }
    // The second run draws what the first drew; the caller's stream of
    // random numbers continues as if nothing had run.
    const auto now = RngState::capture(rng.device.value_or(c10::kCPU));
    rng.restore();
    std::vector<at::Tensor> outs;
    try {
      at::AutoGradMode grad(true);
      outs = fn(inputs);
    } catch (...) {
      now.restore();
      throw;
    }
    now.restore();

    variable_list roots, root_grads;
    for (size_t j = 0; j < returned.size(); ++j) {
      const auto& o = outs[returned[j]];
      if (grads[j].defined() && o.defined() && o.requires_grad()) {
        roots.push_back(o);
        root_grads.push_back(grads[j]);
      }
    }
    variable_list targets;
    std::vector<int64_t> target_of(inputs.size() + params.size(), -1);
    auto add_target = [&](size_t i, const at::Tensor& t) {
      if (t.defined() && t.requires_grad()) {
        target_of[i] = static_cast<int64_t>(targets.size());
        targets.push_back(t);
      }
    };
    for (size_t i = 0; i < inputs.size(); ++i) {
      add_target(i, inputs[i]);
    }
    for (size_t i = 0; i < params.size(); ++i) {
      add_target(inputs.size() + i, params[i]);
    }
    variable_list found;
    if (!roots.empty() && !targets.empty()) {
      found = torch::autograd::grad(
          roots, targets, root_grads, false, false, /*allow_unused=*/true);
    }
    variable_list result(target_of.size());
    for (size_t i = 0; i < target_of.size(); ++i) {
      if (target_of[i] >= 0 && !found.empty()) {
        result[i] = found[target_of[i]];
      }
    }
    release_variables();
    return result;
  }

  void release_variables() override {
    saved.clear();
    fn = nullptr;
  }
  std::string name() const override {
    return "RecomputeBackward";
  }

  SegmentFn fn;
  std::vector<torch::autograd::SavedVariable> saved;
  std::vector<at::Tensor> params;
  std::vector<size_t> returned;
  RngState rng;
};

} // namespace

std::vector<at::Tensor> recompute_segment(
    const SegmentFn& fn,
    const std::vector<at::Tensor>& inputs,
    const std::vector<at::Tensor>& params,
    const std::vector<bool>& differentiable) {
  variable_list all(inputs);
  all.insert(all.end(), params.begin(), params.end());
  if (!torch::autograd::compute_requires_grad(at::TensorList(all))) {
    return fn(inputs); // nothing to backpropagate into: an ordinary run
  }
  c10::Device device(c10::kCPU);
  for (const auto& x : inputs) {
    if (x.defined() && x.is_cuda()) {
      device = x.device();
    }
  }
  auto node = c10::make_intrusive<RecomputeBackward>(
      torch::autograd::collect_next_edges(all));
  node->rng = RngState::capture(device);
  std::vector<at::Tensor> outs;
  {
    at::NoGradGuard no_grad;
    outs = fn(inputs);
  }
  TORCH_CHECK(
      outs.size() == differentiable.size(),
      "recompute: the segment returned ",
      outs.size(),
      " tensors, ",
      differentiable.size(),
      " were declared");
  for (const auto& x : inputs) {
    node->saved.emplace_back(x, /*is_output=*/false);
  }
  node->params = params;
  node->fn = fn;
  for (size_t i = 0; i < outs.size(); ++i) {
    if (differentiable[i] && outs[i].defined() &&
        at::isFloatingType(outs[i].scalar_type())) {
      // A tensor of its own (no view history), with this node as its
      // gradient function.
      outs[i] = outs[i].detach();
      torch::autograd::set_history(outs[i], node);
      node->returned.push_back(i);
    }
  }
  return outs;
}

} // namespace moeyard
