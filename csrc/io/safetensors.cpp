#include "io/safetensors.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>
#include <openssl/evp.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "io/mapped_file.h"
#include "io/safetensors_format.h"

namespace moeyard::io {
namespace {

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
    case at::kFloat8_e4m3fn:
      return "F8_E4M3";
    default:
      TORCH_CHECK(false, "safetensors: cannot store dtype ", t);
  }
}

// A dtype parse_safetensors accepted.
at::ScalarType scalar_type_of(const std::string& s) {
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
      {"I16", at::kShort},
      {"F8_E4M3", at::kFloat8_e4m3fn}};
  auto it = m.find(s);
  TORCH_INTERNAL_ASSERT(it != m.end(), "safetensors: no ScalarType for ", s);
  TORCH_INTERNAL_ASSERT(
      c10::elementSize(it->second) == safetensors_dtype_size(s));
  return it->second;
}

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
  // A file too small for the length field is not mapped: parse_safetensors
  // reports its size without reading it.
  const MappedFile file(path, "safetensors", 8);
  const uint8_t* base = file.data();
  // Every field is checked, overflow-safe, before anything is allocated.
  SafetensorsHeader h;
  try {
    h = parse_safetensors(base, file.size(), path);
  } catch (const FormatError& e) {
    TORCH_CHECK(false, e.what());
  }
  TensorMap out;
  for (const auto& t : h.tensors) {
    auto tensor = at::empty(t.shape, at::dtype(scalar_type_of(t.dtype)));
    if (t.end > t.begin) {
      std::memcpy(
          tensor.mutable_data_ptr(),
          base + h.data_start + t.begin,
          t.end - t.begin);
    }
    out.emplace(t.name, std::move(tensor));
  }
  if (metadata) {
    for (auto& [k, v] : h.metadata) {
      (*metadata)[k] = std::move(v);
    }
  }
  return out;
}

struct SafetensorsFile::Impl {
  explicit Impl(const std::string& path) : file(path, "safetensors", 8) {
    try {
      header = parse_safetensors(file.data(), file.size(), path);
    } catch (const FormatError& e) {
      TORCH_CHECK(false, e.what());
    }
    for (size_t i = 0; i < header.tensors.size(); ++i) {
      index.emplace(header.tensors[i].name, i);
    }
  }
  MappedFile file;
  SafetensorsHeader header;
  std::map<std::string, size_t> index;
};

SafetensorsFile::SafetensorsFile(const std::string& path)
    : impl_(std::make_shared<const Impl>(path)), path_(path) {}

const std::map<std::string, std::string>& SafetensorsFile::metadata() const {
  return impl_->header.metadata;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> n;
  for (const auto& t : impl_->header.tensors) {
    n.push_back(t.name);
  }
  return n;
}

bool SafetensorsFile::has(const std::string& name) const {
  return impl_->index.count(name) > 0;
}

at::Tensor SafetensorsFile::view(const std::string& name) const {
  const auto it = impl_->index.find(name);
  TORCH_CHECK(it != impl_->index.end(), path_, ": no tensor '", name, "'");
  const auto& t = impl_->header.tensors[it->second];
  const auto dtype = at::dtype(scalar_type_of(t.dtype));
  if (t.end == t.begin) {
    return at::empty(t.shape, dtype);
  }
  // The bytes stay mapped while any view lives.
  auto keep = impl_;
  void* data = const_cast<uint8_t*>(
      impl_->file.data() + impl_->header.data_start + t.begin);
  return at::from_blob(
      data, t.shape, [keep](void*) {}, dtype);
}

void SafetensorsFile::release(const std::string& name) const {
  const auto it = impl_->index.find(name);
  if (it == impl_->index.end()) {
    return;
  }
  const auto& t = impl_->header.tensors[it->second];
  const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const auto base = reinterpret_cast<uintptr_t>(impl_->file.data());
  const uintptr_t lo = base + impl_->header.data_start + t.begin;
  const uintptr_t hi = base + impl_->header.data_start + t.end;
  // Whole pages inside the tensor's bytes only (neighbours may be in use).
  const uintptr_t a = (lo + page - 1) / page * page, b = hi / page * page;
  if (a < b) {
    ::madvise(reinterpret_cast<void*>(a), b - a, MADV_DONTNEED);
  }
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
