#include "io/safetensors.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

namespace moeyard::io {
namespace {

constexpr uint64_t kMaxHeader = 100ull << 20; // 100 MiB of JSON is corrupt

const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return "F32";
    case at::kDouble:
      return "F64";
    case at::kBFloat16:
      return "BF16";
    case at::kHalf:
      return "F16";
    case at::kLong:
      return "I64";
    case at::kInt:
      return "I32";
    case at::kByte:
      return "U8";
    case at::kBool:
      return "BOOL";
    default:
      TORCH_CHECK(false, "safetensors: cannot store dtype ", t);
  }
}

at::ScalarType parse_dtype(const std::string& s, const std::string& where) {
  static const std::map<std::string, at::ScalarType> m = {
      {"F32", at::kFloat},
      {"F64", at::kDouble},
      {"BF16", at::kBFloat16},
      {"F16", at::kHalf},
      {"I64", at::kLong},
      {"I32", at::kInt},
      {"U8", at::kByte},
      {"BOOL", at::kBool},
      {"I8", at::kChar},
      {"I16", at::kShort}};
  auto it = m.find(s);
  TORCH_CHECK(it != m.end(), where, ": unsupported dtype '", s, "'");
  return it->second;
}

struct Mapped {
  void* p = MAP_FAILED;
  size_t n = 0;
  ~Mapped() {
    if (p != MAP_FAILED) {
      ::munmap(p, n);
    }
  }
};

} // namespace

void save_safetensors(
    const std::string& path,
    const TensorMap& tensors,
    const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) {
    header["__metadata__"] = metadata;
  }
  std::vector<at::Tensor> data;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    auto c = t.detach().to(at::kCPU).contiguous();
    const uint64_t n = c.numel() * c.element_size();
    header[name] = {
        {"dtype", dtype_name(c.scalar_type())},
        {"shape", c.sizes().vec()},
        {"data_offsets", {offset, offset + n}}};
    offset += n;
    data.push_back(c);
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' '); // align the data to 8 bytes
  const std::string tmp = path + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  TORCH_CHECK(
      f, "safetensors: cannot write ", tmp, " (", std::strerror(errno), ")");
  const uint64_t hn = h.size();
  bool ok =
      std::fwrite(&hn, 8, 1, f) == 1 && std::fwrite(h.data(), 1, hn, f) == hn;
  for (const auto& c : data) {
    const size_t n = c.numel() * c.element_size();
    ok = ok && (n == 0 || std::fwrite(c.const_data_ptr(), 1, n, f) == n);
  }
  ok = ok && std::fflush(f) == 0 && ::fsync(fileno(f)) == 0;
  std::fclose(f);
  TORCH_CHECK(ok, "safetensors: writing ", tmp, " failed (disk full?)");
  TORCH_CHECK(
      std::rename(tmp.c_str(), path.c_str()) == 0,
      "safetensors: cannot rename ",
      tmp,
      " to ",
      path);
}

TensorMap load_safetensors(
    const std::string& path, std::map<std::string, std::string>* metadata) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  TORCH_CHECK(
      fd >= 0,
      "safetensors ",
      path,
      ": cannot open (",
      std::strerror(errno),
      ")");
  struct stat st {};
  ::fstat(fd, &st);
  Mapped m;
  m.n = static_cast<size_t>(st.st_size);
  if (m.n > 0) {
    m.p = ::mmap(nullptr, m.n, PROT_READ, MAP_PRIVATE, fd, 0);
  }
  ::close(fd);
  TORCH_CHECK(
      m.n >= 8 && m.p != MAP_FAILED,
      "safetensors ",
      path,
      ": file too small (",
      m.n,
      " bytes)");
  const auto* base = static_cast<const uint8_t*>(m.p);
  uint64_t hn;
  std::memcpy(&hn, base, 8);
  TORCH_CHECK(
      hn <= kMaxHeader && 8 + hn <= m.n,
      "safetensors ",
      path,
      ": header length ",
      hn,
      " is impossible for a ",
      m.n,
      "-byte file (truncated or not safetensors)");
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(base + 8, base + 8 + hn);
  } catch (const std::exception& e) {
    TORCH_CHECK(
        false, "safetensors ", path, ": header is not valid JSON: ", e.what());
  }
  TORCH_CHECK(
      header.is_object(),
      "safetensors ",
      path,
      ": header is not a JSON object");
  const uint8_t* data = base + 8 + hn;
  const uint64_t data_n = m.n - 8 - hn;
  TensorMap out;
  std::vector<std::pair<uint64_t, uint64_t>> spans;
  for (const auto& [name, info] : header.items()) {
    if (name == "__metadata__") {
      if (metadata) {
        for (const auto& [k, v] : info.items()) {
          (*metadata)[k] = v.is_string() ? v.get<std::string>() : v.dump();
        }
      }
      continue;
    }
    const std::string where = "safetensors " + path + ": tensor '" + name + "'";
    TORCH_CHECK(
        info.is_object() && info.contains("dtype") && info.contains("shape") &&
            info.contains("data_offsets"),
        where,
        ": needs dtype, shape and data_offsets");
    const auto dt = parse_dtype(info["dtype"].get<std::string>(), where);
    std::vector<int64_t> shape;
    uint64_t numel = 1;
    for (const auto& d : info["shape"]) {
      TORCH_CHECK(
          d.is_number_integer() && d.get<int64_t>() >= 0,
          where,
          ": bad shape ",
          info["shape"].dump());
      shape.push_back(d.get<int64_t>());
      numel *= d.get<uint64_t>();
    }
    const auto& off = info["data_offsets"];
    TORCH_CHECK(
        off.is_array() && off.size() == 2,
        where,
        ": data_offsets must be [begin, end]");
    const uint64_t b = off[0].get<uint64_t>(), e = off[1].get<uint64_t>();
    const uint64_t expect = numel * c10::elementSize(dt);
    TORCH_CHECK(
        b <= e && e <= data_n,
        where,
        ": data_offsets [",
        b,
        ", ",
        e,
        ") outside the ",
        data_n,
        "-byte data section");
    TORCH_CHECK(
        e - b == expect,
        where,
        ": ",
        e - b,
        " bytes for shape ",
        info["shape"].dump(),
        " of ",
        info["dtype"].get<std::string>(),
        ", expected ",
        expect);
    spans.emplace_back(b, e);
    auto t = at::empty(shape, at::dtype(dt));
    if (expect > 0) {
      std::memcpy(t.mutable_data_ptr(), data + b, expect);
    }
    out[name] = t;
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i) {
    TORCH_CHECK(
        spans[i].first >= spans[i - 1].second,
        "safetensors ",
        path,
        ": tensors overlap in the data section");
  }
  return out;
}

std::string sha256_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in, "sha256: cannot open ", path);
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), buf.size());
    EVP_DigestUpdate(ctx, buf.data(), in.gcount());
  }
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  EVP_DigestFinal_ex(ctx, md, &n);
  EVP_MD_CTX_free(ctx);
  static const char* hex = "0123456789abcdef";
  std::string s;
  for (unsigned int i = 0; i < n; ++i) {
    s += hex[md[i] >> 4];
    s += hex[md[i] & 15];
  }
  return s;
}

} // namespace moeyard::io
