#include "util/log.h"

#include <spdlog/spdlog.h>

#include <cstdarg>
#include <cstdio>
#include <vector>

namespace moeyard::log {
namespace {
int g_rank = 0;
std::string tagged(const std::string& msg) {
  return g_rank == 0 ? msg : "[rank " + std::to_string(g_rank) + "] " + msg;
}
} // namespace

void set_rank(int rank) {
  g_rank = rank;
}

void info(const std::string& msg) {
  if (g_rank == 0) {
    spdlog::info("{}", msg);
  }
}

void warn(const std::string& msg) {
  spdlog::warn("{}", tagged(msg));
}

void error(const std::string& msg) {
  spdlog::error("{}", tagged(msg));
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
