#pragma once
// The quantization_config of a Hugging Face config.json: which quantized
// weight format the safetensors files use. Import dequantizes each tensor as
// it is read (hf_files.cpp, with the functions of dequantize.h); export
// always writes unquantized weights.

#include <nlohmann/json.hpp>

#include <string>

#include "io/dequantize.h"

namespace moeyard::io {

struct HfQuantization {
  // "" (no quantization_config), "fp8" (block-scaled float8_e4m3fn weights
  // X.weight with float32 X.weight_scale_inv) or "mxfp4" (X_blocks and
  // X_scales in place of X).
  std::string method;
  QuantBlock block; // fp8: weight_block_size
};

// Reads and checks config.json's quantization_config (`file` names it in
// errors): an unknown quant_method, an FP8 format other than e4m3, a
// weight_block_size that is not two positive sizes, static activation
// scales, power-of-two (ue8m0) scales or FP4 experts are errors naming the
// key, the value and what is read.
HfQuantization read_hf_quantization(
    const nlohmann::json& hf_config, const std::string& file);

} // namespace moeyard::io
