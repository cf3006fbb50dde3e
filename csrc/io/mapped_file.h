#pragma once
// A whole file memory-mapped read-only, for the readers that validate a
// binary format in place (safetensors, token shards). Opening checks that the
// path is a regular file; errors name the kind of file and its path. The
// mapping lives as long as the object.

#include <cstddef>
#include <cstdint>
#include <string>

namespace moeyard::io {

class MappedFile {
 public:
  // Maps `path` when it holds at least `min_bytes` bytes; a smaller file is
  // opened and measured but not mapped (mmap refuses 0 bytes), so data() is
  // null and the format parser reports the short size itself. `kind` starts
  // every error: "<kind> <path>: cannot open (No such file or directory)".
  MappedFile(const std::string& path, const char* kind, size_t min_bytes);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  // The file's bytes, or null when it was too small to map.
  const uint8_t* data() const {
    return static_cast<const uint8_t*>(map_);
  }
  size_t size() const {
    return bytes_;
  }

 private:
  void* map_ = nullptr;
  size_t bytes_ = 0;
};

} // namespace moeyard::io
