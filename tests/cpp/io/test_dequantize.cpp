// The dequantizers of quantized Hugging Face weights against plain loops
// over every element: block-scaled FP8 with partial edge blocks, slices of
// rows/columns dequantized alone, MXFP4 nibble order and exponents, and the
// errors for misshapen scales.

#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <cmath>
#include <string>

#include "io/dequantize.h"

namespace {

using moeyard::io::QuantBlock;

// FP4 E2M1 from its bits: sign (bit 3), exponent (bits 2..1, bias 1),
// mantissa (bit 0); exponent 0 is subnormal (0 or 0.5).
float e2m1(int n) {
  const int e = (n >> 1) & 3, m = n & 1;
  const float mag = e == 0 ? 0.5f * m : std::ldexp(1.0f + 0.5f * m, e - 1);
  return (n & 8) ? -mag : mag;
}

// Random float8 values and positive scales.
at::Tensor random_fp8(at::IntArrayRef shape) {
  return (at::randn(shape) * 50).to(at::kFloat8_e4m3fn);
}

// dense[i][j] = float(w[i][j]) * scale[i / br][j / bc], one element at a time.
at::Tensor naive_fp8(const at::Tensor& w, const at::Tensor& s, QuantBlock b) {
  const auto wf = w.to(at::kFloat);
  auto out = at::empty(w.sizes(), at::kFloat);
  for (int64_t i = 0; i < w.size(0); ++i) {
    for (int64_t j = 0; j < w.size(1); ++j) {
      out[i][j] =
          wf[i][j].item<float>() * s[i / b.rows][j / b.cols].item<float>();
    }
  }
  return out;
}

TEST(Dequantize, Fp8PartialBlocksMatchALoop) {
  at::manual_seed(0);
  const QuantBlock b{4, 3};
  const auto w = random_fp8({10, 7}); // 3 x 3 blocks, the last ones partial
  const auto s = at::rand({3, 3}) + 0.1;
  const auto got = moeyard::io::dequantize_fp8_blocks(w, s, b, at::kFloat, "w");
  EXPECT_TRUE(at::equal(got, naive_fp8(w, s, b)));
  const auto bf16 =
      moeyard::io::dequantize_fp8_blocks(w, s, b, at::kBFloat16, "w");
  EXPECT_EQ(bf16.scalar_type(), at::kBFloat16);
  EXPECT_TRUE(at::equal(bf16, naive_fp8(w, s, b).to(at::kBFloat16)));
}

TEST(Dequantize, Fp8SlicesDequantizeAlone) {
  at::manual_seed(1);
  const QuantBlock b{4, 5};
  const auto w = random_fp8({2, 13, 11}); // a stack of two experts
  const auto s = at::rand({2, 4, 3}) + 0.1;
  const auto whole =
      moeyard::io::dequantize_fp8_blocks(w, s, b, at::kFloat, "w");
  for (int64_t e = 0; e < 2; ++e) {
    EXPECT_TRUE(at::equal(whole[e], naive_fp8(w[e], s[e], b)));
  }
  // Rows 3..12 and columns 6..9 of expert 1: block offsets inside blocks.
  const int64_t r0 = 3, R = 9, c0 = 6, C = 3;
  const auto part = moeyard::io::dequantize_fp8_blocks(
      w[1].narrow(0, r0, R).narrow(1, c0, C),
      moeyard::io::fp8_scale_range(s[1], b, r0, R, c0, C),
      b,
      at::kFloat,
      "w",
      r0,
      c0);
  EXPECT_TRUE(at::equal(part, whole[1].narrow(0, r0, R).narrow(1, c0, C)));
}

TEST(Dequantize, Fp8ScaleShapeErrorNamesTensorAndShapes) {
  const auto w = random_fp8({10, 7});
  try {
    moeyard::io::dequantize_fp8_blocks(
        w, at::ones({2, 3}), QuantBlock{4, 3}, at::kFloat, "f: tensor 'x'");
    ADD_FAILURE() << "accepted a [2, 3] scale";
  } catch (const c10::Error& e) {
    const std::string m = e.what_without_backtrace();
    EXPECT_NE(
        m.find("f: tensor 'x': the scale has shape [2, 3], expected "
               "[3, 3] for a weight of shape [10, 7] in 4x3 blocks"),
        std::string::npos)
        << m;
  }
  EXPECT_THROW(
      moeyard::io::dequantize_fp8_blocks(
          w.to(at::kFloat), at::ones({3, 3}), {4, 3}, at::kFloat, "x"),
      c10::Error);
}

TEST(Dequantize, Mxfp4MatchesALoop) {
  at::manual_seed(2);
  const auto blocks = at::randint(0, 256, {3, 5, 2, 16}, at::kByte);
  auto scales = at::randint(100, 140, {3, 5, 2}, at::kByte);
  scales[0][0][0] = 0; // 2^-127, subnormal in float32
  const auto got =
      moeyard::io::dequantize_mxfp4(blocks, scales, at::kFloat, "w");
  ASSERT_EQ(got.sizes(), at::IntArrayRef({3, 5, 64}));
  const auto* b = blocks.const_data_ptr<uint8_t>();
  const auto* s = scales.const_data_ptr<uint8_t>();
  const auto* o = got.const_data_ptr<float>();
  for (int64_t g = 0; g < scales.numel(); ++g) {
    for (int64_t k = 0; k < 32; ++k) {
      const uint8_t byte = b[g * 16 + k / 2];
      const int nibble = k % 2 == 0 ? byte & 15 : byte >> 4; // low first
      const float want = e2m1(nibble) * std::pow(2.0f, float(s[g]) - 127.0f);
      ASSERT_EQ(o[g * 32 + k], want) << "group " << g << " value " << k;
    }
  }
  // Experts 1..2 alone give the same rows.
  EXPECT_TRUE(at::equal(
      moeyard::io::dequantize_mxfp4(
          blocks.narrow(0, 1, 2), scales.narrow(0, 1, 2), at::kFloat, "w"),
      got.narrow(0, 1, 2)));
  EXPECT_TRUE(at::equal(
      moeyard::io::dequantize_mxfp4(blocks, scales, at::kBFloat16, "w"),
      got.to(at::kBFloat16)));
}

TEST(Dequantize, Mxfp4BadShapesAndNaNScaleAreErrors) {
  const auto blocks = at::zeros({2, 4, 16}, at::kByte);
  auto expect_error = [](auto f, const std::string& text) {
    try {
      f();
      ADD_FAILURE() << "no error, expected " << text;
    } catch (const c10::Error& e) {
      const std::string m = e.what_without_backtrace();
      EXPECT_NE(m.find(text), std::string::npos) << m;
    }
  };
  expect_error(
      [&] {
        moeyard::io::dequantize_mxfp4(
            blocks, at::zeros({2, 3}, at::kByte), at::kFloat, "t");
      },
      "t: scales of dtype Byte and shape [2, 3], expected uint8 (U8) [2, 4]");
  expect_error(
      [&] {
        moeyard::io::dequantize_mxfp4(
            at::zeros({2, 4, 8}, at::kByte),
            at::zeros({2, 4}, at::kByte),
            at::kFloat,
            "t");
      },
      "t: blocks of dtype Byte and shape [2, 4, 8], expected uint8 (U8) "
      "[..., groups, 16]");
  auto nan = at::zeros({2, 4}, at::kByte);
  nan[1][2] = 255;
  expect_error(
      [&] { moeyard::io::dequantize_mxfp4(blocks, nan, at::kFloat, "t"); },
      "t: scale byte 255 (NaN in E8M0) at flat index 6");
}

TEST(Dequantize, Fp4TableIsE2M1) {
  for (int n = 0; n < 16; ++n) {
    EXPECT_EQ(moeyard::io::fp4_e2m1_value(n), e2m1(n)) << n;
  }
}

} // namespace
