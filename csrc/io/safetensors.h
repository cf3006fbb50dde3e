#pragma once
// safetensors read/write (https://github.com/huggingface/safetensors format:
// u64 little-endian header length, JSON header, raw little-endian data).
// The reader memory-maps the file and checks every header field against it
// before allocating (parse_safetensors, safetensors_format.h): header size
// cap, JSON types, dtype, shape x dtype size == byte span without overflow,
// spans inside the data section and not overlapping. Errors name the file
// and the tensor.

#include <ATen/core/Tensor.h>

#include <map>
#include <string>

namespace moeyard::io {

using TensorMap = std::map<std::string, at::Tensor>;

// Writes tensors (any device; copied to CPU, contiguous) atomically:
// <path>.tmp, fsync, rename. metadata goes to "__metadata__".
void save_safetensors(
    const std::string& path,
    const TensorMap& tensors,
    const std::map<std::string, std::string>& metadata = {});

// Loads every tensor (CPU, owning copies).
TensorMap load_safetensors(
    const std::string& path,
    std::map<std::string, std::string>* metadata = nullptr);

// Hex SHA-256 of a file's bytes.
std::string sha256_file(const std::string& path);

} // namespace moeyard::io
