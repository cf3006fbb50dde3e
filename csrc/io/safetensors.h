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
#include <memory>
#include <string>
#include <vector>

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

// A safetensors file memory-mapped and checked as load_safetensors checks
// it, whose tensors are read on demand: view() is a CPU tensor over the
// mapped bytes (no copy; it keeps the mapping alive), so copying a slice of
// it reads only that slice from disk.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);

  const std::string& path() const {
    return path_;
  }
  const std::map<std::string, std::string>& metadata() const;
  // Tensor names, in name order.
  std::vector<std::string> names() const;
  bool has(const std::string& name) const;
  // The tensor `name` over the mapped bytes. Read-only: never write to it.
  at::Tensor view(const std::string& name) const;
  // Drops the pages of `name` from this process's resident memory once read
  // (they stay in the page cache; a later view reads them again).
  void release(const std::string& name) const;

 private:
  struct Impl;
  std::shared_ptr<const Impl> impl_;
  std::string path_;
};

// Hex SHA-256 of a file's bytes.
std::string sha256_file(const std::string& path);

} // namespace moeyard::io
