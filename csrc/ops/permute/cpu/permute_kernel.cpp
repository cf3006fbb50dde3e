// permute on the CPU: row gathers, parallel over rows; the backward
// accumulates per token in row order, parallel over column blocks so that no
// two threads write the same element (deterministic, no atomics).

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "ops/permute/permute_checks.h"

namespace moeyard::ops {
namespace {

void check_row_tokens(const at::Tensor& row_token, int64_t T, const char* op) {
  const int64_t* rt = row_token.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < row_token.numel(); ++i) {
    TORCH_CHECK(
        rt[i] >= -1 && rt[i] < T,
        op,
        ": row_token must be in [-1, num_tokens=",
        T,
        "), got ",
        rt[i],
        " at row ",
        i);
  }
}

at::Tensor permute_cpu(const at::Tensor& x_in, const at::Tensor& row_token_in) {
  detail::check_permute_args(x_in, row_token_in, "permute", "x");
  const auto x = x_in.contiguous();
  const auto row_token = row_token_in.contiguous();
  const int64_t T = x.size(0), H = x.size(1), N = row_token.size(0);
  check_row_tokens(row_token, T, "permute");
  auto rows = at::empty({N, H}, x.options());
  const int64_t* rt = row_token.const_data_ptr<int64_t>();
  const size_t row_bytes = H * x.element_size();
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(rows.mutable_data_ptr());
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(H, 1));
  at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if (rt[i] >= 0) {
        std::memcpy(dst + i * row_bytes, src + rt[i] * row_bytes, row_bytes);
      } else {
        std::memset(dst + i * row_bytes, 0, row_bytes);
      }
    }
  });
  return rows;
}

at::Tensor permute_backward_cpu(
    const at::Tensor& grad_rows_in, const at::Tensor& row_token_in, int64_t T) {
  detail::check_permute_backward_args(grad_rows_in, row_token_in, T);
  const auto g = grad_rows_in.contiguous();
  const auto row_token = row_token_in.contiguous();
  check_row_tokens(row_token, T, "permute_backward");
  const int64_t H = g.size(1), N = row_token.size(0);
  auto grad_x = at::zeros({T, H}, g.options());
  const int64_t* rt = row_token.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, g.scalar_type(), "permute_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* gr = g.const_data_ptr<scalar_t>();
        scalar_t* gx = grad_x.mutable_data_ptr<scalar_t>();
        // A token has at most a few rows; sum them in acc_t per column block.
        constexpr int64_t kBlock = 256;
        const int64_t n_blocks = (H + kBlock - 1) / kBlock;
        at::parallel_for(0, n_blocks, 1, [&](int64_t bb, int64_t be) {
          std::vector<acc_t> acc;
          for (int64_t blk = bb; blk < be; ++blk) {
            const int64_t h0 = blk * kBlock;
            const int64_t w = std::min(kBlock, H - h0);
            acc.assign(static_cast<size_t>(T) * w, acc_t(0));
            for (int64_t i = 0; i < N; ++i) {
              if (rt[i] < 0) {
                continue;
              }
              acc_t* a = acc.data() + rt[i] * w;
              const scalar_t* r = gr + i * H + h0;
              for (int64_t j = 0; j < w; ++j) {
                a[j] += static_cast<acc_t>(r[j]);
              }
            }
            for (int64_t t = 0; t < T; ++t) {
              for (int64_t j = 0; j < w; ++j) {
                gx[t * H + h0 + j] = static_cast<scalar_t>(acc[t * w + j]);
              }
            }
          }
        });
      });
  return grad_x;
}

} // namespace

TORCH_LIBRARY_IMPL(moeyard, CPU, m) {
  m.impl("permute", &permute_cpu);
  m.impl("permute_backward", &permute_backward_cpu);
}

} // namespace moeyard::ops
