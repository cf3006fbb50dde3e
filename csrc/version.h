#pragma once

namespace moeyard {
inline constexpr const char* kVersion = "0.1.0";
} // namespace moeyard
