#include "io/safetensors_format.h"

#include <algorithm>
#include <limits>
#include <nlohmann/json.hpp>
#include <utility>

namespace moeyard::io {
namespace {

using json = nlohmann::json;

constexpr uint64_t kInt64Max = std::numeric_limits<int64_t>::max();

// A JSON value for an error message, never its whole dump: a header value
// can be megabytes deep, and dump() recurses.
std::string describe(const json& v) {
  switch (v.type()) {
    case json::value_t::array:
      return "a list of " + std::to_string(v.size()) + " items";
    case json::value_t::object:
      return "an object";
    case json::value_t::string: {
      // Cutting may split a UTF-8 sequence, which dump() would throw on:
      // replace it with U+FFFD instead.
      const auto& s = v.get_ref<const std::string&>();
      const bool cut = s.size() > 40;
      return json(cut ? s.substr(0, 37) : s)
                 .dump(-1, ' ', false, json::error_handler_t::replace) +
             (cut ? "..." : "");
    }
    default: // number, boolean, null
      return v.dump();
  }
}

bool is_size(const json& v) {
  return v.is_number_unsigned() ||
         (v.is_number_integer() && v.get<int64_t>() >= 0);
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) {
      s += ',';
    }
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

// One entry of the header, `where` = "safetensors <path>: tensor '<name>'".
SafetensorsTensor parse_tensor(
    const std::string& name,
    const json& info,
    uint64_t data_size,
    const std::string& where) {
  if (!info.is_object() || !info.contains("dtype") || !info.contains("shape") ||
      !info.contains("data_offsets")) {
    format_error(where, ": needs dtype, shape and data_offsets");
  }
  SafetensorsTensor t;
  t.name = name;
  const json& dtype = info.at("dtype");
  if (!dtype.is_string()) {
    format_error(where, ": dtype must be a string, got ", describe(dtype));
  }
  t.dtype = dtype.get<std::string>();
  t.element_size = safetensors_dtype_size(t.dtype);
  if (t.element_size == 0) {
    format_error(where, ": unsupported dtype ", describe(dtype));
  }

  const json& shape = info.at("shape");
  if (!shape.is_array()) {
    format_error(
        where, ": bad shape: expected a list of sizes, got ", describe(shape));
  }
  if (shape.size() > kSafetensorsMaxRank) {
    format_error(
        where,
        ": bad shape: ",
        shape.size(),
        " dimensions (at most ",
        kSafetensorsMaxRank,
        ")");
  }
  // extent: the product of max(size, 1), which at::empty's strides need to
  // fit in int64 even when a size is 0.
  uint64_t numel = 1, extent = t.element_size;
  for (size_t i = 0; i < shape.size(); ++i) {
    const json& d = shape[i];
    if (!is_size(d) || d.get<uint64_t>() > kInt64Max) {
      format_error(
          where,
          ": bad shape: size ",
          i,
          " is ",
          describe(d),
          ", expected an integer in [0, 2^63)");
    }
    const uint64_t n = d.get<uint64_t>();
    t.shape.push_back(static_cast<int64_t>(n));
    if (!mul_fits(extent, std::max<uint64_t>(n, 1), &extent) ||
        extent > kInt64Max) {
      format_error(
          where,
          ": bad shape ",
          shape_string(t.shape),
          "...: more than 2^63 bytes of ",
          t.dtype);
    }
    numel *= n; // cannot overflow: numel * element_size <= extent
  }
  const uint64_t bytes = numel * t.element_size;

  const json& off = info.at("data_offsets");
  if (!off.is_array() || off.size() != 2) {
    format_error(
        where, ": data_offsets must be [begin, end], got ", describe(off));
  }
  for (size_t k = 0; k < 2; ++k) {
    if (!is_size(off[k])) {
      format_error(
          where,
          ": data_offsets[",
          k,
          "] is ",
          describe(off[k]),
          ", expected an integer >= 0");
    }
  }
  t.begin = off[0].get<uint64_t>();
  t.end = off[1].get<uint64_t>();
  if (t.begin > t.end || t.end > data_size) {
    format_error(
        where,
        ": data_offsets [",
        t.begin,
        ", ",
        t.end,
        ") outside the ",
        data_size,
        "-byte data section");
  }
  if (t.end - t.begin != bytes) {
    format_error(
        where,
        ": ",
        t.end - t.begin,
        " bytes for shape ",
        shape_string(t.shape),
        " of ",
        t.dtype,
        ", expected ",
        bytes);
  }
  return t;
}

void parse_metadata(
    const json& m,
    const std::string& path,
    std::map<std::string, std::string>* out) {
  if (!m.is_object()) {
    format_error(
        "safetensors ",
        path,
        ": __metadata__ must be an object of strings, got ",
        describe(m));
  }
  for (const auto& [k, v] : m.items()) {
    if (v.is_array() || v.is_object()) {
      format_error(
          "safetensors ",
          path,
          ": __metadata__ '",
          k,
          "' must be a string, got ",
          describe(v));
    }
    // Scalars other than strings are kept as their JSON text.
    (*out)[k] = v.is_string() ? v.get<std::string>() : v.dump();
  }
}

} // namespace

size_t safetensors_dtype_size(const std::string& dtype) {
  static const std::map<std::string, size_t> sizes = {
      {"F64", 8},
      {"F32", 4},
      {"BF16", 2},
      {"F16", 2},
      {"I64", 8},
      {"I32", 4},
      {"I16", 2},
      {"I8", 1},
      {"U8", 1},
      {"BOOL", 1},
      {"F8_E4M3", 1}}; // FP8 releases' weights (DeepSeek-V3)
  const auto it = sizes.find(dtype);
  return it == sizes.end() ? 0 : it->second;
}

SafetensorsHeader parse_safetensors(
    const uint8_t* data, size_t size, const std::string& path) {
  if (size < 8) {
    format_error("safetensors ", path, ": file too small (", size, " bytes)");
  }
  uint64_t hn = 0;
  for (int i = 7; i >= 0; --i) {
    hn = (hn << 8) | data[i];
  }
  // hn <= 100 MiB first: 8 + hn cannot overflow.
  if (hn > kSafetensorsMaxHeader || 8 + hn > size) {
    format_error(
        "safetensors ",
        path,
        ": header length ",
        hn,
        " is impossible for a ",
        size,
        "-byte file (truncated or not safetensors)");
  }
  json header;
  try {
    header = json::parse(data + 8, data + 8 + hn);
  } catch (const json::exception& e) {
    // what() is "[json.exception.parse_error.101] parse error at ...".
    const std::string what = e.what();
    const auto tag = what.find("] ");
    format_error(
        "safetensors ",
        path,
        ": header is not valid JSON: ",
        tag == std::string::npos ? what : what.substr(tag + 2));
  }
  if (!header.is_object()) {
    format_error(
        "safetensors ",
        path,
        ": header is not a JSON object (got ",
        describe(header),
        ")");
  }
  SafetensorsHeader h;
  h.data_start = 8 + hn;
  h.data_size = size - h.data_start;
  for (const auto& [name, info] : std::as_const(header).items()) {
    if (name == "__metadata__") {
      parse_metadata(info, path, &h.metadata);
      continue;
    }
    h.tensors.push_back(parse_tensor(
        name,
        info,
        h.data_size,
        "safetensors " + path + ": tensor '" + name + "'"));
  }
  // No two spans share a byte (empty spans may touch others' ends).
  std::vector<const SafetensorsTensor*> order;
  for (const auto& t : h.tensors) {
    order.push_back(&t);
  }
  std::sort(order.begin(), order.end(), [](const auto* a, const auto* b) {
    return std::make_pair(a->begin, a->end) < std::make_pair(b->begin, b->end);
  });
  for (size_t i = 1; i < order.size(); ++i) {
    const auto *a = order[i - 1], *b = order[i];
    if (b->begin < a->end) {
      format_error(
          "safetensors ",
          path,
          ": tensors overlap in the data section: '",
          a->name,
          "' [",
          a->begin,
          ", ",
          a->end,
          ") and '",
          b->name,
          "' [",
          b->begin,
          ", ",
          b->end,
          ")");
    }
  }
  return h;
}

} // namespace moeyard::io
