// load_safetensors and parse_safetensors on valid and crafted files: shape
// products that overflow, offsets of the wrong JSON type or range, dtype not
// a string, metadata too deep to print. Every error names the file and the
// tensor; none is a crash or a bare JSON-library exception.

#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include "bad_files.h"
#include "io/safetensors.h"
#include "io/safetensors_format.h"

namespace {

using moeyard::io::load_safetensors;
using moeyard_test::le;

// A file of `header` (JSON text) and `data_bytes` zero bytes.
std::string raw(const std::string& header, size_t data_bytes = 0) {
  return le(header.size(), 8) + header + std::string(data_bytes, '\0');
}

std::string repeat(const std::string& s, int n) {
  std::string out;
  for (int i = 0; i < n; ++i) {
    out += s;
  }
  return out;
}

class SafetensorsFile : public moeyard_test::BadFiles {};

TEST_F(SafetensorsFile, RoundTripIsUnchanged) {
  const auto p = (std::filesystem::path(dir()) / "ok.safetensors").string();
  moeyard::io::TensorMap in;
  in["a"] = at::arange(6, at::kFloat).view({2, 3});
  in["b"] = at::tensor({1, 2, 3}, at::kLong);
  in["empty"] = at::zeros({0, 5}, at::kBFloat16);
  in["flag"] = at::ones({}, at::kBool);
  moeyard::io::save_safetensors(p, in, {{"format", "pt"}});
  std::map<std::string, std::string> meta;
  const auto out = load_safetensors(p, &meta);
  ASSERT_EQ(out.size(), in.size());
  for (const auto& [name, t] : in) {
    EXPECT_TRUE(at::equal(out.at(name), t)) << name;
    EXPECT_EQ(out.at(name).scalar_type(), t.scalar_type()) << name;
    EXPECT_EQ(out.at(name).sizes(), t.sizes()) << name;
  }
  EXPECT_EQ(meta.at("format"), "pt");
}

TEST_F(SafetensorsFile, ScalarMetadataIsKeptAsJsonText) {
  const auto p = write(
      "m.safetensors",
      raw(R"({"__metadata__":{"a":"x","n":5,"f":true},)"
          R"("w":{"dtype":"I8","shape":[2],"data_offsets":[0,2]}})",
          2));
  std::map<std::string, std::string> meta;
  load_safetensors(p, &meta);
  EXPECT_EQ(meta.at("a"), "x");
  EXPECT_EQ(meta.at("n"), "5");
  EXPECT_EQ(meta.at("f"), "true");
}

struct Bad {
  std::string header; // JSON
  size_t data_bytes;
  std::string what; // expected in the message, after the file name
};

// Each was a crash, a nlohmann exception without the file name, or a file
// accepted with a wrapped-around size before the checks were overflow-safe.
const std::vector<Bad> kBadHeaders = {
    // shape products that overflow uint64: 2^32 * 2^32 * 4 bytes wraps to 0
    {R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})",
     0,
     "tensor 'w': bad shape [4294967296,4294967296]...: more than 2^63 bytes"},
    {R"({"w":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,0]}})",
     0,
     "tensor 'w': bad shape [4611686018427387904]...: more than 2^63 bytes"},
    // a zero size does not make the other sizes' strides fit
    {R"({"w":{"dtype":"U8","shape":[0,4294967296,4294967296],"data_offsets":[0,0]}})",
     0,
     "tensor 'w': bad shape [0,4294967296,4294967296]...: more than 2^63"},
    {R"({"w":{"dtype":"F32","shape":[9223372036854775808],"data_offsets":[0,0]}})",
     0,
     "tensor 'w': bad shape: size 0 is 9223372036854775808, expected an "
     "integer in [0, 2^63)"},
    {R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})",
     8,
     "tensor 'w': bad shape: size 0 is -2"},
    {R"({"w":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})",
     8,
     "tensor 'w': bad shape: size 0 is 2.0"},
    {R"({"w":{"dtype":"F32","shape":5,"data_offsets":[0,20]}})",
     20,
     "tensor 'w': bad shape: expected a list of sizes, got 5"},
    {R"({"w":{"dtype":"F32","shape":{"a":2},"data_offsets":[0,8]}})",
     8,
     "tensor 'w': bad shape: expected a list of sizes, got an object"},
    // offsets: negative, strings, floats, huge, wrong arity
    {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}})",
     8,
     "tensor 'w': data_offsets[0] is -8, expected an integer >= 0"},
    {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":["0","8"]}})",
     8,
     "tensor 'w': data_offsets[0] is \"0\", expected an integer >= 0"},
    {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8.5]}})",
     8,
     "tensor 'w': data_offsets[1] is 8.5, expected an integer >= 0"},
    {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,18446744073709551616]}})",
     8,
     "tensor 'w': data_offsets[1] is 1.8446744073709552e+19"},
    {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[18446744073709551615,7]}})",
     8,
     "tensor 'w': data_offsets [18446744073709551615, 7) outside the 8-byte"},
    {R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[18446744073709551615,18446744073709551615]}})",
     8,
     "outside the 8-byte data section"},
    {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0]}})",
     8,
     "tensor 'w': data_offsets must be [begin, end], got a list of 1 items"},
    {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":null}})",
     8,
     "tensor 'w': data_offsets must be [begin, end], got null"},
    // dtype not a string, unknown
    {R"({"w":{"dtype":5,"shape":[2],"data_offsets":[0,8]}})",
     8,
     "tensor 'w': dtype must be a string, got 5"},
    {R"({"w":{"dtype":["F32"],"shape":[2],"data_offsets":[0,8]}})",
     8,
     "tensor 'w': dtype must be a string, got a list of 1 items"},
    {R"({"w":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})",
     8,
     "tensor 'w': unsupported dtype \"Q4\""},
    {R"({"w":[1,2,3]})", 0, "tensor 'w': needs dtype, shape and data_offsets"},
    // the header itself, metadata
    {R"([1,2])", 0, "header is not a JSON object (got a list of 2 items)"},
    // quoting a long value cuts it, maybe inside a UTF-8 sequence (found by
    // tests/fuzz: dump() threw on the cut)
    {"\"" + std::string(36, 'x') + repeat("\xC3\xA9", 10) + "\"",
     0,
     "header is not a JSON object (got \"" + std::string(36, 'x') +
         "\xEF\xBF\xBD\"...)"},
    {R"({"__metadata__":5})", 0, "__metadata__ must be an object of strings"},
    {R"({"__metadata__":{"k":["v"]}})", 0, "__metadata__ 'k' must be a string"},
    {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
     R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
     12,
     "tensors overlap in the data section: 'a' [0, 8) and 'b' [4, 12)"},
};

TEST_F(SafetensorsFile, BadHeadersNameFileTensorAndField) {
  for (size_t i = 0; i < kBadHeaders.size(); ++i) {
    const auto& c = kBadHeaders[i];
    SCOPED_TRACE(c.header);
    const auto p = write(
        "bad" + std::to_string(i) + ".safetensors",
        raw(c.header, c.data_bytes));
    MOEYARD_EXPECT_FILE_ERROR(p, c.what, load_safetensors(p));
  }
}

TEST_F(SafetensorsFile, BadLengthsAndNonFiles) {
  auto p = write("tiny.safetensors", "\x01\x02");
  MOEYARD_EXPECT_FILE_ERROR(p, "file too small (2 bytes)", load_safetensors(p));
  p = write("zero.safetensors", "");
  MOEYARD_EXPECT_FILE_ERROR(p, "file too small (0 bytes)", load_safetensors(p));
  p = write("len.safetensors", std::string(8, '\xff') + "{}");
  MOEYARD_EXPECT_FILE_ERROR(
      p,
      "header length 18446744073709551615 is impossible",
      load_safetensors(p));
  p = write("json.safetensors", raw("{\"w\":"));
  MOEYARD_EXPECT_FILE_ERROR(p, "header is not valid JSON", load_safetensors(p));
  MOEYARD_EXPECT_FILE_ERROR(
      dir(), "not a regular file", load_safetensors(dir()));
}

// dump() of a JSON value recurses once per level: printing this metadata
// value overflowed the stack. Parsing and freeing it must not recurse.
TEST_F(SafetensorsFile, DeeplyNestedValuesAreNotPrinted) {
  const size_t depth = 1000000;
  const auto nest = std::string(depth, '[') + std::string(depth, ']');
  auto p =
      write("deep.safetensors", raw("{\"__metadata__\":{\"k\":" + nest + "}}"));
  MOEYARD_EXPECT_FILE_ERROR(
      p,
      "__metadata__ 'k' must be a string, got a list of 1 items",
      load_safetensors(p));
  p = write(
      "deep_shape.safetensors",
      raw("{\"w\":{\"dtype\":\"F32\",\"shape\":[" + nest +
          "],\"data_offsets\":[0,0]}}"));
  MOEYARD_EXPECT_FILE_ERROR(
      p,
      "tensor 'w': bad shape: size 0 is a list of 1 items",
      load_safetensors(p));
}

TEST(SafetensorsFormat, ParsesWithoutFiles) {
  const std::string h =
      R"({"b":{"dtype":"BF16","shape":[3],"data_offsets":[8,14]},)"
      R"("a":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}})";
  const auto bytes = raw(h, 16);
  const auto parsed = moeyard::io::parse_safetensors(
      reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "mem");
  EXPECT_EQ(parsed.data_start, 8 + h.size());
  EXPECT_EQ(parsed.data_size, 16u);
  ASSERT_EQ(parsed.tensors.size(), 2u);
  EXPECT_EQ(parsed.tensors[0].name, "a");
  EXPECT_EQ(parsed.tensors[1].dtype, "BF16");
  EXPECT_EQ(parsed.tensors[1].element_size, 2u);
  EXPECT_EQ(parsed.tensors[1].shape, std::vector<int64_t>{3});
  EXPECT_EQ(parsed.tensors[1].begin, 8u);
  EXPECT_EQ(parsed.tensors[1].end, 14u);
  try {
    moeyard::io::parse_safetensors(nullptr, 3, "mem");
    ADD_FAILURE() << "accepted 3 bytes";
  } catch (const moeyard::io::FormatError& e) {
    EXPECT_STREQ(e.what(), "safetensors mem: file too small (3 bytes)");
  }
}

// Every dtype the parser accepts loads as the ScalarType of its size.
TEST_F(SafetensorsFile, EveryParsedDtypeLoads) {
  for (const char* d :
       {"F64",
        "F32",
        "BF16",
        "F16",
        "I64",
        "I32",
        "I16",
        "I8",
        "U8",
        "BOOL",
        "F8_E4M3"}) {
    const size_t n = moeyard::io::safetensors_dtype_size(d);
    ASSERT_GT(n, 0u) << d;
    const auto p = write(
        std::string(d) + ".safetensors",
        raw(std::string(R"({"t":{"dtype":")") + d +
                R"(","shape":[2],"data_offsets":[0,)" + std::to_string(2 * n) +
                "]}}",
            2 * n));
    const auto t = load_safetensors(p).at("t");
    EXPECT_EQ(static_cast<size_t>(t.element_size()), n) << d;
  }
}

} // namespace
