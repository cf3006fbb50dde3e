#pragma once
// Activation recompute (gradient checkpointing): a segment of the forward
// runs without keeping its intermediate activations; the backward runs it
// again, with the random state of the first run, and backpropagates through
// the second run. The train.recompute modes choose the segments of a block
// (docs/training.md, "Activation recompute").

#include <ATen/core/Tensor.h>

#include <functional>
#include <string>
#include <vector>

namespace moeyard {

// Which part of a Transformer block is recomputed in backward.
enum class Recompute {
  none, // nothing: every activation is kept
  moe, // the feed-forward sub-block: mlp_norm and the MoE layer (the dense
       // MLP in a layer without experts)
  attention, // the attention sub-block: attn_norm and attention
  full, // the whole block
};

// The mode names in enum order: "none moe attention full".
inline constexpr const char* kRecomputeModes = "none moe attention full";
// The mode named `name`; the error of another name starts with `who` and
// names the value and the allowed names.
Recompute parse_recompute(const std::string& name, const std::string& who);
std::string recompute_name(Recompute mode);

// A segment's computation: outputs from inputs. It may read tensors it
// captures (parameters, masks) but must not modify them, and must draw its
// random numbers from the default generators only.
using SegmentFn =
    std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>&)>;

// Runs fn(inputs) now without recording its graph and returns its outputs
// (undefined ones stay undefined). Only `inputs` are saved for backward,
// with the default CPU generator's state (and the CUDA one's of the inputs'
// device); backward restores that state, runs fn again with grad enabled
// on detached inputs, and backpropagates the outputs' gradients into
// `inputs` and `params` (the tensors fn captures that need gradients).
// Outputs i with differentiable[i] false (statistics, indices) get no
// gradient. Collectives inside fn run again in backward: every rank must
// recompute the same segments in the same order (they do when every rank
// builds the same model with the same recompute settings).
std::vector<at::Tensor> recompute_segment(
    const SegmentFn& fn,
    const std::vector<at::Tensor>& inputs,
    const std::vector<at::Tensor>& params,
    const std::vector<bool>& differentiable);

} // namespace moeyard
