#pragma once
// Hugging Face checkpoints (config.json + safetensors, single file or sharded
// with model.safetensors.index.json) into the C++ model and back.
//
// Import: config.json's model_type picks the family; every key that changes
// the math is mapped onto ModelConfig or rejected with an error naming the
// file, the key and the value (never a silently different model); a key
// absent from config.json takes the default of the family's transformers
// config class, as transformers loads the same file. Weights are read in
// either on-disk expert layout (per-expert 2-D tensors or fused 3-D tensors)
// and every tensor of the file must be used: missing, extra and misshapen
// tensors are errors naming the file and the tensor. Quantized releases
// (config.json's quantization_config: block-scaled FP8, MXFP4) are
// dequantized tensor by tensor into the model's dtype (hf_quantization.h).
//
// Export writes the family's own layout (per-expert 2-D tensors, the names
// transformers' save_pretrained writes) and a config.json that transformers
// loads. Each family is one file under csrc/io/hf/ (the list is
// csrc/io/hf/registry.cpp); docs/checkpoints.md lists the families and the
// keys honoured.

#include <nlohmann/json.hpp>

#include <functional>
#include <map>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/transformer.h"
#include "parallel/piece.h"

namespace moeyard::io {

// The families with an importer (config.json model_type values).
std::vector<std::string> hf_families();

// ModelConfig of a config.json object. `file` names it in errors.
ModelConfig hf_model_config(
    const nlohmann::json& hf_config, const std::string& file);

// Reads <dir>/config.json.
nlohmann::json read_hf_config(const std::string& dir);

// Copies the weights of the HF checkpoint in `dir` into `model`, which must
// have been built from hf_model_config of the same config.json (routing
// options such as capacity or aux coefficients may differ). With
// `piece_of`, each of the model's tensors is that piece of the full one:
// expert slices read only their experts' tensors; other pieces read their
// source tensor (one at a time) and keep their rows.
void load_hf_weights(
    TransformerImpl& model,
    const nlohmann::json& hf_config,
    const std::string& dir,
    const std::function<parallel::Piece(const std::string&)>& piece_of = {});

// A model built and loaded from an HF checkpoint directory, in `dtype` (a
// model.dtype name).
Transformer load_hf_model(
    const std::string& dir, const std::string& dtype = "float32");

// config.json of `model` for `family` (a model_type). `base` (may be null) is
// the original config.json, whose other keys (token ids, ...) are kept.
// Errors name what the family cannot express.
nlohmann::json hf_config_of(
    const ModelConfig& c,
    const std::string& family,
    const nlohmann::json& base);

// Writes config.json and the weights in the family's layout into `out_dir`,
// sharding into files of at most max_shard_bytes (with an index) when larger.
void save_hf(
    const TransformerImpl& model,
    const std::string& family,
    const std::string& out_dir,
    const nlohmann::json& base = nullptr,
    int64_t max_shard_bytes = int64_t(5) << 30);

} // namespace moeyard::io
