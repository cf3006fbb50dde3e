#include "util/log.h"

#include <spdlog/spdlog.h>

#include <cstdarg>
#include <cstdio>
#include <vector>

namespace moeyard::log {

void info(const std::string& msg) {
  spdlog::info("{}", msg);
}

void warn(const std::string& msg) {
  spdlog::warn("{}", msg);
}

void error(const std::string& msg) {
  spdlog::error("{}", msg);
}

std::string format(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  va_list copy;
  va_copy(copy, args);
  const int n = std::vsnprintf(nullptr, 0, fmt, copy);
  va_end(copy);
  std::vector<char> buf(n > 0 ? n + 1 : 1);
  std::vsnprintf(buf.data(), buf.size(), fmt, args);
  va_end(args);
  return std::string(buf.data(), n > 0 ? n : 0);
}

} // namespace moeyard::log
