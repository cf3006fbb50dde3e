#pragma once
// Console logging through spdlog. spdlog's Debian build uses the system fmt,
// which clashes with the fmt headers inside LibTorch, so spdlog lives in its
// own translation unit (target moeyard_log, no LibTorch includes) and the
// rest of the code passes finished strings.

#include <string>

namespace moeyard::log {

// In a multi-process run only rank 0 prints info; warnings and errors of
// other ranks carry "[rank r]".
void set_rank(int rank);

void info(const std::string& msg);
void warn(const std::string& msg);
void error(const std::string& msg);

// printf-style formatting into a std::string.
std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

} // namespace moeyard::log
