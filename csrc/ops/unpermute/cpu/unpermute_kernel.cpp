// unpermute on the CPU: each token gathers its K rows (deterministic, no
// atomics); the backward writes each row from the one (token, slot) pair
// that points to it, and takes one dot product per pair for the weights.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <vector>

#include "ops/unpermute/unpermute_checks.h"

namespace moeyard::ops {
namespace {

void check_slots(const at::Tensor& slot, int64_t N, const char* op) {
  const int64_t* s = slot.const_data_ptr<int64_t>();
  const int64_t K = slot.size(1);
  for (int64_t p = 0; p < slot.numel(); ++p) {
    TORCH_CHECK(
        s[p] >= -1 && s[p] < N,
        op,
        ": slot must be in [-1, num_rows=",
        N,
        "), got ",
        s[p],
        " at token ",
        p / K,
        ", slot ",
        p % K);
  }
}

template <typename scalar_t, typename w_t>
void unpermute_kernel(
    const at::Tensor& rows,
    const at::Tensor& slot,
    const at::Tensor& weights,
    at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = slot.size(0), K = slot.size(1), H = rows.size(1);
  const scalar_t* r = rows.const_data_ptr<scalar_t>();
  const int64_t* s = slot.const_data_ptr<int64_t>();
  const w_t* w = weights.const_data_ptr<w_t>();
  scalar_t* out = y.mutable_data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(H, 1));
  at::parallel_for(0, T, grain, [&](int64_t b, int64_t e) {
    std::vector<acc_t> acc(H);
    for (int64_t t = b; t < e; ++t) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t k = 0; k < K; ++k) {
        const int64_t row = s[t * K + k];
        if (row < 0) {
          continue;
        }
        const acc_t wk = static_cast<acc_t>(w[t * K + k]);
        const scalar_t* src = r + row * H;
        for (int64_t h = 0; h < H; ++h) {
          acc[h] += wk * static_cast<acc_t>(src[h]);
        }
      }
      scalar_t* dst = out + t * H;
      for (int64_t h = 0; h < H; ++h) {
        dst[h] = static_cast<scalar_t>(acc[h]);
      }
    }
  });
}

template <typename scalar_t, typename w_t>
void unpermute_backward_kernel(
    const at::Tensor& grad_y,
    const at::Tensor& rows,
    const at::Tensor& slot,
    const at::Tensor& weights,
    at::Tensor& grad_rows,
    at::Tensor& grad_weights) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = slot.size(0), K = slot.size(1), H = rows.size(1);
  const scalar_t* gy = grad_y.const_data_ptr<scalar_t>();
  const scalar_t* r = rows.const_data_ptr<scalar_t>();
  const int64_t* s = slot.const_data_ptr<int64_t>();
  const w_t* w = weights.const_data_ptr<w_t>();
  scalar_t* gr = grad_rows.mutable_data_ptr<scalar_t>();
  w_t* gw = grad_weights.mutable_data_ptr<w_t>();
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(H, 1));
  at::parallel_for(0, T, grain, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const scalar_t* g = gy + t * H;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t row = s[t * K + k];
        if (row < 0) {
          gw[t * K + k] = w_t(0);
          continue;
        }
        const acc_t wk = static_cast<acc_t>(w[t * K + k]);
        const scalar_t* src = r + row * H;
        scalar_t* dst = gr + row * H;
        acc_t dot = 0;
        for (int64_t h = 0; h < H; ++h) {
          const acc_t gh = static_cast<acc_t>(g[h]);
          dot += gh * static_cast<acc_t>(src[h]);
          dst[h] = static_cast<scalar_t>(wk * gh);
        }
        gw[t * K + k] = static_cast<w_t>(dot);
      }
    }
  });
}

// Calls fn.template operator()<scalar_t, w_t>() for the dtype pair in use.
template <typename Fn>
void dispatch_rows_weights(at::ScalarType rows_t, at::ScalarType w_t, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, rows_t, "unpermute", [&] {
        if (w_t == rows_t) {
          fn.template operator()<scalar_t, scalar_t>();
        } else {
          fn.template operator()<scalar_t, float>();
        }
      });
}

at::Tensor unpermute_cpu(
    const at::Tensor& rows_in,
    const at::Tensor& slot_in,
    const at::Tensor& weights_in) {
  detail::check_unpermute_args(rows_in, slot_in, weights_in, "unpermute");
  const auto rows = rows_in.contiguous();
  const auto slot = slot_in.contiguous();
  const auto weights = weights_in.contiguous();
  check_slots(slot, rows.size(0), "unpermute");
  auto y = at::empty({slot.size(0), rows.size(1)}, rows.options());
  dispatch_rows_weights(
      rows.scalar_type(),
      weights.scalar_type(),
      [&]<typename scalar_t, typename w_t>() {
        unpermute_kernel<scalar_t, w_t>(rows, slot, weights, y);
      });
  return y;
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cpu(
    const at::Tensor& grad_y_in,
    const at::Tensor& rows_in,
    const at::Tensor& slot_in,
    const at::Tensor& weights_in) {
  constexpr const char* op = "unpermute_backward";
  detail::check_unpermute_backward_args(
      grad_y_in, rows_in, slot_in, weights_in);
  const auto rows = rows_in.contiguous();
  const auto slot = slot_in.contiguous();
  const auto weights = weights_in.contiguous();
  const auto grad_y = grad_y_in.to(rows.scalar_type()).contiguous();
  check_slots(slot, rows.size(0), op);
  // Rows that no slot points to (padding, dropped capacity) get zero.
  auto grad_rows = at::zeros_like(rows, at::MemoryFormat::Contiguous);
  auto grad_weights = at::empty_like(weights, at::MemoryFormat::Contiguous);
  dispatch_rows_weights(
      rows.scalar_type(),
      weights.scalar_type(),
      [&]<typename scalar_t, typename w_t>() {
        unpermute_backward_kernel<scalar_t, w_t>(
            grad_y, rows, slot, weights, grad_rows, grad_weights);
      });
  return {grad_rows, grad_weights};
}

} // namespace

TORCH_LIBRARY_IMPL(moeyard, CPU, m) {
  m.impl("unpermute", &unpermute_cpu);
  m.impl("unpermute_backward", &unpermute_backward_cpu);
}

} // namespace moeyard::ops
