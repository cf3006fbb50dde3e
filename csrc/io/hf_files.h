#pragma once
// The files of a Hugging Face checkpoint directory: the safetensors weights
// (one model.safetensors, or shards listed in model.safetensors.index.json)
// read with the tensors each came from, and written back in shards.
// Quantized tensors (hf_quantization.h) are dequantized one at a time, as
// they are taken.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <map>
#include <set>
#include <string>

#include "io/hf_quantization.h"
#include "io/safetensors.h"

namespace moeyard::io {

// The tensors of a checkpoint directory; tracks which were used.
class HfTensors {
 public:
  // `quant`: the directory's quantization_config; `dtype`: the dtype
  // quantized tensors are dequantized into (the model's).
  explicit HfTensors(
      const std::string& dir,
      HfQuantization quant = {},
      at::ScalarType dtype = at::kFloat);

  // Stored as it is, or quantized as <name>_blocks/<name>_scales (MXFP4).
  bool has(const std::string& name) const {
    return tensors_.count(name) > 0 || tensors_.count(name + "_blocks") > 0;
  }

  // The tensor `name`, checked against `shape` (empty: any). A quantized
  // tensor comes dequantized, in the layout of its unquantized form: FP8
  // `name` (float8_e4m3fn) with `name`_scale_inv, or MXFP4 `name`_blocks
  // and `name`_scales (transposed back, as transformers does).
  at::Tensor take(const std::string& name, at::IntArrayRef shape = {});

  // Marks `name` (and its quantization tensors) used without reading it:
  // another rank's expert.
  void skip(const std::string& name);

  // Every stored tensor must have been used, except derived rotary
  // inverse-frequency buffers of old checkpoints and those `skip` names.
  void check_all_used(
      const std::function<bool(const std::string&)>& skip) const;

 private:
  void add_index(const std::string& path);
  void add_file(const std::string& path);
  at::Tensor take_stored(const std::string& name);
  at::Tensor take_mxfp4(const std::string& name);
  std::string dir_;
  HfQuantization quant_;
  at::ScalarType dtype_;
  TensorMap tensors_;
  std::map<std::string, std::string> origin_;
  std::set<std::string> used_;
};

// Writes `tensors` into out_dir as model.safetensors, or, past
// max_shard_bytes, as shards model-0000k-of-0000n.safetensors in name order
// with model.safetensors.index.json (a tensor larger than that gets a shard
// of its own). Earlier model*.safetensors files there are removed first.
void write_hf_weights(
    const std::string& out_dir,
    const TensorMap& tensors,
    int64_t max_shard_bytes);

} // namespace moeyard::io
