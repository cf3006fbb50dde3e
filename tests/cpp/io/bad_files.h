#pragma once
// Helpers for the file-reader tests: crafted files in a per-test temporary
// directory and the message of the error a reader throws.

#include <c10/util/Exception.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>

namespace moeyard_test {

class BadFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = std::filesystem::temp_directory_path() /
           ("moeyard_" + std::string(info->name()) + "_" +
            std::to_string(::getpid()));
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override {
    std::filesystem::remove_all(dir_);
  }
  // Writes `bytes` to <dir>/<name>; returns the path.
  std::string write(const std::string& name, const std::string& bytes) {
    const auto path = (dir_ / name).string();
    std::ofstream(path, std::ios::binary) << bytes;
    return path;
  }
  std::string dir() const {
    return dir_.string();
  }

 private:
  std::filesystem::path dir_;
};

// Little-endian bytes of v.
inline std::string le(uint64_t v, int bytes) {
  std::string s;
  for (int i = 0; i < bytes; ++i) {
    s += static_cast<char>((v >> (8 * i)) & 0xFF);
  }
  return s;
}

// The c10::Error message fn throws; fails the test if it throws nothing or
// something else.
template <typename Fn>
std::string reader_error(Fn&& fn) {
  try {
    fn();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected a c10::Error, got: " << e.what();
    return "";
  }
  ADD_FAILURE() << "expected an error, the file was accepted";
  return "";
}

} // namespace moeyard_test

// The error names the file and says `what`.
#define MOEYARD_EXPECT_FILE_ERROR(path, what, ...)                      \
  do {                                                                  \
    const std::string msg_ =                                            \
        ::moeyard_test::reader_error([&] { __VA_ARGS__; });             \
    EXPECT_NE(msg_.find(path), std::string::npos) << msg_;              \
    EXPECT_NE(msg_.find(what), std::string::npos)                       \
        << "expected \"" << (what) << "\" in: " << msg_;                \
    EXPECT_EQ(msg_.find("[json.exception"), std::string::npos) << msg_; \
  } while (0)
