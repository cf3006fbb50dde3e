// Dequantizers of quantized Hugging Face weights (dequantize.h): one pass
// over the quantized bytes per slice, writing the dense slice directly (no
// weight-sized temporaries besides the output).

#include "io/dequantize.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/Float8_e4m3fn.h>

#include <array>
#include <cmath>
#include <vector>

namespace moeyard::io {
namespace {

// Rows a parallel_for task takes at least (a row is a few hundred elements).
constexpr int64_t kGrain = 64;

std::vector<int64_t> leading(const at::Tensor& t, int64_t keep_last) {
  const auto s = t.sizes();
  return std::vector<int64_t>(s.begin(), s.end() - keep_last);
}

} // namespace

int64_t fp8_scale_count(int64_t first, int64_t n, int64_t b) {
  return (first % b + n + b - 1) / b;
}

at::Tensor fp8_scale_range(
    const at::Tensor& scale_inv,
    QuantBlock block,
    int64_t row0,
    int64_t R,
    int64_t col0,
    int64_t C) {
  TORCH_CHECK(
      block.rows > 0 && block.cols > 0 && row0 >= 0 && col0 >= 0 &&
          scale_inv.dim() >= 2,
      "fp8_scale_range: bad block, offsets or scale rank");
  return scale_inv
      .narrow(-2, row0 / block.rows, fp8_scale_count(row0, R, block.rows))
      .narrow(-1, col0 / block.cols, fp8_scale_count(col0, C, block.cols));
}

at::Tensor dequantize_fp8_blocks(
    const at::Tensor& w_in,
    const at::Tensor& scale_in,
    QuantBlock block,
    at::ScalarType dtype,
    const std::string& what,
    int64_t row0,
    int64_t col0) {
  TORCH_CHECK(
      w_in.scalar_type() == at::kFloat8_e4m3fn,
      what,
      ": dtype ",
      w_in.scalar_type(),
      ", expected float8_e4m3fn (F8_E4M3)");
  TORCH_CHECK(
      w_in.dim() >= 2,
      what,
      ": shape ",
      w_in.sizes(),
      ", expected a matrix (or a stack of matrices) for block scaling");
  TORCH_CHECK(
      scale_in.scalar_type() == at::kFloat,
      what,
      ": the scale has dtype ",
      scale_in.scalar_type(),
      ", expected float32 (F32)");
  TORCH_CHECK(
      block.rows > 0 && block.cols > 0,
      what,
      ": block size [",
      block.rows,
      ", ",
      block.cols,
      "], expected positive sizes");
  TORCH_CHECK(row0 >= 0 && col0 >= 0, what, ": negative slice offset");
  const int64_t R = w_in.size(-2), C = w_in.size(-1);
  const int64_t nR = fp8_scale_count(row0, R, block.rows);
  const int64_t nC = fp8_scale_count(col0, C, block.cols);
  auto expected = leading(w_in, 2);
  expected.push_back(nR);
  expected.push_back(nC);
  TORCH_CHECK(
      scale_in.sizes() == at::IntArrayRef(expected),
      what,
      ": the scale has shape ",
      scale_in.sizes(),
      ", expected ",
      at::IntArrayRef(expected),
      " for a weight of shape ",
      w_in.sizes(),
      " in ",
      block.rows,
      "x",
      block.cols,
      " blocks");
  const at::Tensor w = w_in.contiguous();
  const at::Tensor s = scale_in.contiguous();
  at::Tensor out = at::empty(w.sizes(), w.options().dtype(dtype));
  const int64_t rows = w.numel() / std::max<int64_t>(C, 1);
  if (rows == 0 || C == 0) {
    return out;
  }
  const int64_t roff = row0 % block.rows, coff = col0 % block.cols;
  const auto* wp = w.const_data_ptr<c10::Float8_e4m3fn>();
  const float* sp = s.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dtype, "dequantize_fp8_blocks", [&] {
        scalar_t* op = out.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
          for (int64_t row = begin; row < end; ++row) {
            const int64_t m = row / R, r = row % R;
            const float* srow = sp + (m * nR + (r + roff) / block.rows) * nC;
            const c10::Float8_e4m3fn* src = wp + row * C;
            scalar_t* dst = op + row * C;
            for (int64_t c = 0; c < C; ++c) {
              const float v =
                  static_cast<float>(src[c]) * srow[(c + coff) / block.cols];
              dst[c] = static_cast<scalar_t>(v);
            }
          }
        });
      });
  return out;
}

float fp4_e2m1_value(uint8_t nibble) {
  static constexpr std::array<float, 8> kMagnitude = {
      0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  const float v = kMagnitude[nibble & 7];
  return (nibble & 8) ? -v : v;
}

at::Tensor dequantize_mxfp4(
    const at::Tensor& blocks_in,
    const at::Tensor& scales_in,
    at::ScalarType dtype,
    const std::string& what) {
  TORCH_CHECK(
      blocks_in.scalar_type() == at::kByte && blocks_in.dim() >= 2 &&
          blocks_in.size(-1) == 16,
      what,
      ": blocks of dtype ",
      blocks_in.scalar_type(),
      " and shape ",
      blocks_in.sizes(),
      ", expected uint8 (U8) [..., groups, 16] (32 FP4 values per group)");
  const auto groups_shape = leading(blocks_in, 1);
  TORCH_CHECK(
      scales_in.scalar_type() == at::kByte &&
          scales_in.sizes() == at::IntArrayRef(groups_shape),
      what,
      ": scales of dtype ",
      scales_in.scalar_type(),
      " and shape ",
      scales_in.sizes(),
      ", expected uint8 (U8) ",
      at::IntArrayRef(groups_shape),
      " (one E8M0 exponent per group of the blocks ",
      blocks_in.sizes(),
      ")");
  const at::Tensor blocks = blocks_in.contiguous();
  const at::Tensor scales = scales_in.contiguous();
  const int64_t G = scales.numel();
  const uint8_t* sp = scales.const_data_ptr<uint8_t>();
  for (int64_t g = 0; g < G; ++g) {
    TORCH_CHECK(
        sp[g] != 255,
        what,
        ": scale byte 255 (NaN in E8M0) at flat index ",
        g,
        ", expected an exponent 0..254");
  }
  std::array<float, 255> pow2{};
  for (int s = 0; s < 255; ++s) {
    pow2[s] = std::ldexp(1.0f, s - 127); // exact, 2^-127 is subnormal
  }
  std::array<float, 16> fp4{};
  for (uint8_t n = 0; n < 16; ++n) {
    fp4[n] = fp4_e2m1_value(n);
  }
  auto out_shape = groups_shape;
  out_shape.back() *= 32;
  at::Tensor out = at::empty(out_shape, blocks.options().dtype(dtype));
  const uint8_t* bp = blocks.const_data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dtype, "dequantize_mxfp4", [&] {
        scalar_t* op = out.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, G, kGrain, [&](int64_t begin, int64_t end) {
          for (int64_t g = begin; g < end; ++g) {
            const float scale = pow2[sp[g]];
            const uint8_t* src = bp + g * 16;
            scalar_t* dst = op + g * 32;
            for (int k = 0; k < 16; ++k) {
              dst[2 * k] = static_cast<scalar_t>(fp4[src[k] & 15] * scale);
              dst[2 * k + 1] = static_cast<scalar_t>(fp4[src[k] >> 4] * scale);
            }
          }
        });
      });
  return out;
}

} // namespace moeyard::io
