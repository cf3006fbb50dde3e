#pragma once
// This process's resident memory, from /proc/self/status (Linux): the
// current size (VmRSS) and its peak so far (VmHWM), in bytes; 0 where the
// file or the field is missing.

#include <cstdint>
#include <fstream>
#include <string>

namespace moeyard::util {

inline int64_t proc_status_bytes(const char* field) {
  std::ifstream in("/proc/self/status");
  std::string key;
  while (in >> key) {
    if (key == field) {
      int64_t kb = 0;
      in >> kb;
      return kb * 1024;
    }
    std::getline(in, key);
  }
  return 0;
}

inline int64_t rss_bytes() {
  return proc_status_bytes("VmRSS:");
}

inline int64_t peak_rss_bytes() {
  return proc_status_bytes("VmHWM:");
}

} // namespace moeyard::util
