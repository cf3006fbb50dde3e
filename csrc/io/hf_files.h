#pragma once
// The files of a Hugging Face checkpoint directory: the safetensors weights
// (one model.safetensors, or shards listed in model.safetensors.index.json)
// read with the tensors each came from, and written back in shards.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <map>
#include <set>
#include <string>

#include "io/safetensors.h"

namespace moeyard::io {

// The tensors of a checkpoint directory; tracks which were used.
class HfTensors {
 public:
  explicit HfTensors(const std::string& dir);

  bool has(const std::string& name) const {
    return tensors_.count(name) > 0;
  }

  // The tensor `name`, checked against `shape` (empty: any).
  at::Tensor take(const std::string& name, at::IntArrayRef shape = {});

  // Every stored tensor must have been used, except derived rotary
  // inverse-frequency buffers of old checkpoints and those `skip` names.
  void check_all_used(
      const std::function<bool(const std::string&)>& skip) const;

 private:
  void add_index(const std::string& path);
  void add_file(const std::string& path);
  std::string dir_;
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
