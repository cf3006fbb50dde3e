// grouped_mm on the CPU: one BLAS GEMM per expert on views of the rows
// (the BLAS call is itself multi-threaded), written straight into the output.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <vector>

#include "ops/grouped_mm/grouped_mm_checks.h"

namespace moeyard::ops {
namespace {

std::vector<int64_t> read_offsets(
    const at::Tensor& offsets, int64_t N, const char* op) {
  const auto o = offsets.contiguous();
  const int64_t* p = o.const_data_ptr<int64_t>();
  std::vector<int64_t> v(p, p + o.numel());
  detail::check_grouped_mm_offsets(v.data(), v.size(), N, op);
  return v;
}

at::Tensor grouped_mm_cpu(
    const at::Tensor& input_in,
    const at::Tensor& weight_in,
    const at::Tensor& expert_offsets) {
  detail::check_grouped_mm_args(
      input_in, weight_in, expert_offsets, "grouped_mm");
  const auto input = input_in.contiguous();
  const auto weight = weight_in.contiguous();
  const int64_t N = input.size(0), E = weight.size(0), Dout = weight.size(1);
  const auto off = read_offsets(expert_offsets, N, "grouped_mm");
  const bool covers_all = off.front() == 0 && off.back() == N;
  auto out = covers_all ? at::empty({N, Dout}, input.options())
                        : at::zeros({N, Dout}, input.options());
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    if (n == 0) {
      continue;
    }
    auto o = out.narrow(0, off[e], n);
    at::mm_out(o, input.narrow(0, off[e], n), weight[e].t());
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_backward_cpu(
    const at::Tensor& grad_out_in,
    const at::Tensor& input_in,
    const at::Tensor& weight_in,
    const at::Tensor& expert_offsets) {
  constexpr const char* op = "grouped_mm_backward";
  detail::check_grouped_mm_args(input_in, weight_in, expert_offsets, op);
  const auto input = input_in.contiguous();
  const auto weight = weight_in.contiguous();
  const int64_t N = input.size(0), E = weight.size(0), Dout = weight.size(1);
  TORCH_CHECK(
      grad_out_in.dim() == 2 && grad_out_in.size(0) == N &&
          grad_out_in.size(1) == Dout,
      op,
      ": grad_out must have shape [",
      N,
      ", ",
      Dout,
      "], got ",
      grad_out_in.sizes());
  const auto grad_out = grad_out_in.to(input.scalar_type()).contiguous();
  const auto off = read_offsets(expert_offsets, N, op);
  auto grad_input = at::zeros_like(input, at::MemoryFormat::Contiguous);
  auto grad_weight = at::empty_like(weight, at::MemoryFormat::Contiguous);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    auto gw = grad_weight[e];
    if (n == 0) {
      gw.zero_();
      continue;
    }
    const auto go = grad_out.narrow(0, off[e], n);
    auto gi = grad_input.narrow(0, off[e], n);
    at::mm_out(gi, go, weight[e]);
    at::mm_out(gw, go.t(), input.narrow(0, off[e], n));
  }
  return {grad_input, grad_weight};
}

} // namespace

TORCH_LIBRARY_IMPL(moeyard, CPU, m) {
  m.impl("grouped_mm", &grouped_mm_cpu);
  m.impl("grouped_mm_backward", &grouped_mm_backward_cpu);
}

} // namespace moeyard::ops
