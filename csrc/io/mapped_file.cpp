#include "io/mapped_file.h"

#include <c10/util/Exception.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace moeyard::io {

MappedFile::MappedFile(
    const std::string& path, const char* kind, size_t min_bytes) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  TORCH_CHECK(
      fd >= 0, kind, " ", path, ": cannot open (", std::strerror(errno), ")");
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    TORCH_CHECK(false, kind, " ", path, ": not a regular file");
  }
  bytes_ = static_cast<size_t>(st.st_size);
  if (bytes_ < min_bytes || bytes_ == 0) {
    ::close(fd);
    return;
  }
  void* p = ::mmap(nullptr, bytes_, PROT_READ, MAP_PRIVATE, fd, 0);
  const int err = errno;
  ::close(fd);
  TORCH_CHECK(
      p != MAP_FAILED,
      kind,
      " ",
      path,
      ": mmap failed (",
      std::strerror(err),
      ")");
  map_ = p;
}

MappedFile::~MappedFile() {
  if (map_) {
    ::munmap(map_, bytes_);
  }
}

} // namespace moeyard::io
