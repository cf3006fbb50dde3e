// The moeyard operator library: every schema is declared here, once.
// Kernels are registered per dispatch key next to each op (cpu/, meta,
// autograd/). Schemas are the contract of DESIGN.md; changing one needs a
// reason in the commit message.

#include <torch/library.h>

TORCH_LIBRARY(moeyard, m) {
  m.def(
      "router_topk(Tensor logits, int k, str score_fn=\"softmax\", "
      "bool renormalize=True, float scale=1.0, Tensor? selection_bias=None, "
      "int num_groups=1, int topk_groups=1) "
      "-> (Tensor weights, Tensor indices, Tensor scores)");
  m.def(
      "router_topk_backward(Tensor grad_weights, Tensor grad_scores, "
      "Tensor indices, Tensor scores, str score_fn, bool renormalize, "
      "float scale) -> Tensor");

  m.def(
      "route_plan(Tensor indices, Tensor weights, int num_experts, "
      "int capacity=-1, str drop_policy=\"position\") "
      "-> (Tensor row_token, Tensor slot, Tensor expert_offsets, "
      "Tensor counts)");

  m.def("permute(Tensor x, Tensor row_token) -> Tensor");
  m.def(
      "permute_backward(Tensor grad_rows, Tensor row_token, "
      "SymInt num_tokens) -> Tensor");

  m.def("unpermute(Tensor rows, Tensor slot, Tensor weights) -> Tensor");
  m.def(
      "unpermute_backward(Tensor grad_y, Tensor rows, Tensor slot, "
      "Tensor weights) -> (Tensor grad_rows, Tensor grad_weights)");

  m.def(
      "grouped_mm(Tensor input, Tensor weight, Tensor expert_offsets) "
      "-> Tensor");
  m.def(
      "grouped_mm_backward(Tensor grad_out, Tensor input, Tensor weight, "
      "Tensor expert_offsets) -> (Tensor grad_input, Tensor grad_weight)");

  m.def("swiglu(Tensor gate_up, Tensor? expert_offsets=None) -> Tensor");
  m.def(
      "swiglu_backward(Tensor grad, Tensor gate_up, "
      "Tensor? expert_offsets=None) -> Tensor");
}
