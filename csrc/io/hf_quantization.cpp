// config.json's quantization_config (hf_quantization.h), with the defaults
// of transformers' FineGrainedFP8Config and Mxfp4Config for absent keys.

#include "io/hf_quantization.h"

#include <c10/util/Exception.h>

#include <vector>

#include "io/hf/json_reader.h"

namespace moeyard::io {
using json = nlohmann::json;

HfQuantization read_hf_quantization(const json& hf, const std::string& file) {
  HfQuantization q;
  if (!hf.contains("quantization_config") ||
      hf.at("quantization_config").is_null()) {
    return q;
  }
  const json& j = hf.at("quantization_config");
  TORCH_CHECK(
      j.is_object(),
      file,
      ": quantization_config must be an object, got ",
      j.dump());
  const hf::JsonReader r{j, file + " quantization_config"};
  q.method = r.need<std::string>("quant_method");
  if (q.method == "mxfp4") {
    // modules_to_not_convert is not needed: a tensor is read as MXFP4
    // exactly when the files store it as <name>_blocks and <name>_scales.
    return q;
  }
  TORCH_CHECK(
      q.method == "fp8",
      file,
      ": quantization_config.quant_method '",
      q.method,
      "' is not supported (fp8: block-scaled float8_e4m3fn as in "
      "DeepSeek-V3's release; mxfp4: as in GPT-OSS's release)");
  r.only<std::string>("fmt", "e4m3", "float8_e4m3fn weights are read");
  r.only<std::string>(
      "activation_scheme", "dynamic", "static activation scales are not read");
  r.only<std::string>("scale_fmt", "float", "float32 weight_scale_inv is read");
  r.only<std::string>("expert_dtype", "fp8", "FP8 experts are read");
  // FineGrainedFP8Config's default is [128, 128]; null (one scale per
  // tensor) is not a block size.
  TORCH_CHECK(
      !j.contains("weight_block_size") || !j.at("weight_block_size").is_null(),
      file,
      ": quantization_config.weight_block_size is null (one scale per "
      "tensor), which is not supported; expected [rows, cols] block sizes");
  const auto b = r.get<std::vector<int64_t>>(
      "weight_block_size", std::vector<int64_t>{128, 128});
  TORCH_CHECK(
      b.size() == 2 && b[0] > 0 && b[1] > 0,
      file,
      ": quantization_config.weight_block_size = ",
      j.value("weight_block_size", json()).dump(),
      ", expected two positive block sizes [rows, cols]");
  q.block = QuantBlock{b[0], b[1]};
  return q;
}

} // namespace moeyard::io
