// swiglu on the CPU: row-parallel, at::vec for float32/float64, float32 math
// for bfloat16/float16.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "ops/swiglu/swiglu_checks.h"

namespace moeyard::ops {
namespace {

template <typename T>
inline T sigmoid_scalar(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// One row: out[j] = silu(g[j]) * u[j].
template <typename scalar_t>
void swiglu_row(
    const scalar_t* g, const scalar_t* u, scalar_t* out, int64_t F) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t j = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    using Vec = at::vec::Vectorized<scalar_t>;
    const Vec one(scalar_t(1));
    for (; j + Vec::size() <= F; j += Vec::size()) {
      const Vec gv = Vec::loadu(g + j), uv = Vec::loadu(u + j);
      const Vec sig = one / (one + gv.neg().exp());
      (gv * sig * uv).store(out + j);
    }
  }
  for (; j < F; ++j) {
    const acc_t gj = static_cast<acc_t>(g[j]);
    out[j] = static_cast<scalar_t>(
        gj * sigmoid_scalar(gj) * static_cast<acc_t>(u[j]));
  }
}

// One row of the backward: d gate and d up from d out.
template <typename scalar_t>
void swiglu_backward_row(
    const scalar_t* dy,
    const scalar_t* g,
    const scalar_t* u,
    scalar_t* dg,
    scalar_t* du,
    int64_t F) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t j = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    using Vec = at::vec::Vectorized<scalar_t>;
    const Vec one(scalar_t(1));
    for (; j + Vec::size() <= F; j += Vec::size()) {
      const Vec dyv = Vec::loadu(dy + j), gv = Vec::loadu(g + j),
                uv = Vec::loadu(u + j);
      const Vec sig = one / (one + gv.neg().exp());
      const Vec silu = gv * sig;
      (dyv * uv * sig * (one + gv * (one - sig))).store(dg + j);
      (dyv * silu).store(du + j);
    }
  }
  for (; j < F; ++j) {
    const acc_t gj = static_cast<acc_t>(g[j]);
    const acc_t uj = static_cast<acc_t>(u[j]);
    const acc_t d = static_cast<acc_t>(dy[j]);
    const acc_t sig = sigmoid_scalar(gj);
    dg[j] = static_cast<scalar_t>(d * uj * sig * (acc_t(1) + gj * (1 - sig)));
    du[j] = static_cast<scalar_t>(d * gj * sig);
  }
}

at::Tensor swiglu_cpu(
    const at::Tensor& gate_up_in,
    const std::optional<at::Tensor>& expert_offsets) {
  detail::check_swiglu_args(gate_up_in, "swiglu");
  detail::check_swiglu_offsets(expert_offsets, gate_up_in, "swiglu");
  const auto gate_up = gate_up_in.contiguous();
  const int64_t N = gate_up.size(0), F = gate_up.size(1) / 2;
  const auto [begin, end] = detail::swiglu_span(expert_offsets, N, "swiglu");
  auto out = at::empty({N, F}, gate_up.options());
  out.narrow(0, 0, begin).zero_();
  out.narrow(0, end, N - end).zero_();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(F, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, gate_up.scalar_type(), "swiglu_cpu", [&] {
        const scalar_t* x = gate_up.const_data_ptr<scalar_t>();
        scalar_t* y = out.mutable_data_ptr<scalar_t>();
        at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) {
            swiglu_row(x + i * 2 * F, x + i * 2 * F + F, y + i * F, F);
          }
        });
      });
  return out;
}

at::Tensor swiglu_backward_cpu(
    const at::Tensor& grad_in,
    const at::Tensor& gate_up_in,
    const std::optional<at::Tensor>& expert_offsets) {
  detail::check_swiglu_backward_args(grad_in, gate_up_in);
  detail::check_swiglu_offsets(expert_offsets, gate_up_in, "swiglu_backward");
  const auto gate_up = gate_up_in.contiguous();
  const auto grad = grad_in.to(gate_up.scalar_type()).contiguous();
  const int64_t N = gate_up.size(0), F = gate_up.size(1) / 2;
  const auto [begin, end] =
      detail::swiglu_span(expert_offsets, N, "swiglu_backward");
  auto grad_gate_up = at::empty_like(gate_up, at::MemoryFormat::Contiguous);
  grad_gate_up.narrow(0, 0, begin).zero_();
  grad_gate_up.narrow(0, end, N - end).zero_();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(F, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf,
      at::kBFloat16,
      gate_up.scalar_type(),
      "swiglu_backward_cpu",
      [&] {
        const scalar_t* x = gate_up.const_data_ptr<scalar_t>();
        const scalar_t* dy = grad.const_data_ptr<scalar_t>();
        scalar_t* dx = grad_gate_up.mutable_data_ptr<scalar_t>();
        at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) {
            const scalar_t* row = x + i * 2 * F;
            scalar_t* drow = dx + i * 2 * F;
            swiglu_backward_row(dy + i * F, row, row + F, drow, drow + F, F);
          }
        });
      });
  return grad_gate_up;
}

} // namespace

TORCH_LIBRARY_IMPL(moeyard, CPU, m) {
  m.impl("swiglu", &swiglu_cpu);
  m.impl("swiglu_backward", &swiglu_backward_cpu);
}

} // namespace moeyard::ops
