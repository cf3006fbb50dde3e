#pragma once
// Dequantization of the weight formats of quantized Hugging Face releases,
// as functions of (quantized slice, scale slice) -> dense slice: a reader
// that owns a range of rows or experts dequantizes that range alone. The
// products are computed in float32 (as transformers does) and rounded once
// to the requested dtype. `what` names the tensor (and its file) in errors.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

namespace moeyard::io {

// A block of a block-scaled weight: `rows` x `cols` elements share a scale.
struct QuantBlock {
  int64_t rows = 128;
  int64_t cols = 128;
};

// Block-scaled FP8 (DeepSeek-V3's release, transformers' "fp8" method):
// `w` [..., R, C] float8_e4m3fn holds rows [row0, row0 + R) and columns
// [col0, col0 + C) of a weight whose block (i, j) is scaled by
// scale_inv[..., i, j] (float32); `scale_inv` holds the blocks those rows
// and columns touch, from block (row0 / block.rows, col0 / block.cols) on
// (fp8_scale_range). Edge blocks may be partial. Returns float(w) * scale
// per element, as `dtype`.
at::Tensor dequantize_fp8_blocks(
    const at::Tensor& w,
    const at::Tensor& scale_inv,
    QuantBlock block,
    at::ScalarType dtype,
    const std::string& what,
    int64_t row0 = 0,
    int64_t col0 = 0);

// The part of a whole weight's scale_inv [..., ceil(rows / b), ceil(cols / b)]
// that dequantize_fp8_blocks needs for rows [row0, row0 + R) and columns
// [col0, col0 + C).
at::Tensor fp8_scale_range(
    const at::Tensor& scale_inv,
    QuantBlock block,
    int64_t row0,
    int64_t R,
    int64_t col0,
    int64_t C);

// Number of scale rows (or columns) of a weight dimension of `n` elements
// starting at `first` with blocks of `b`: ceil((first % b + n) / b).
int64_t fp8_scale_count(int64_t first, int64_t n, int64_t b);

// MXFP4 (OCP microscaling, GPT-OSS's release, transformers' "mxfp4"
// method): `blocks` [..., G, 16] uint8 holds 32 FP4 E2M1 values per group,
// two per byte with the low nibble first; `scales` [..., G] uint8 are E8M0
// exponents (2^(s - 127); 255, NaN in E8M0, is refused). Returns
// [..., G * 32] with value * 2^(s - 127), as `dtype`. Any range of the
// leading dimensions (rows, experts) can be dequantized alone.
at::Tensor dequantize_mxfp4(
    const at::Tensor& blocks,
    const at::Tensor& scales,
    at::ScalarType dtype,
    const std::string& what);

// The 16 values of FP4 E2M1 by nibble: 0, 0.5, 1, 1.5, 2, 3, 4, 6, then
// their negatives (the sign is bit 3).
float fp4_e2m1_value(uint8_t nibble);

} // namespace moeyard::io
