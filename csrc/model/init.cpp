#include "model/init.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <mutex>

#include "model/transformer.h"

namespace moeyard {

namespace {

thread_local c10::Device g_param_device{c10::kCPU};

// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as
// 1, 2, 3", SC'11): 10 rounds over a 128-bit counter under a 64-bit key.
struct Philox {
  uint32_t k0, k1;

  void operator()(uint32_t c[4]) const {
    uint32_t a = k0, b = k1;
    for (int round = 0; round < 10; ++round) {
      const uint64_t p0 = uint64_t(0xD2511F53u) * c[0];
      const uint64_t p1 = uint64_t(0xCD9E8D57u) * c[2];
      const uint32_t n0 = uint32_t(p1 >> 32) ^ c[1] ^ a;
      const uint32_t n2 = uint32_t(p0 >> 32) ^ c[3] ^ b;
      c[1] = uint32_t(p1);
      c[3] = uint32_t(p0);
      c[0] = n0;
      c[2] = n2;
      a += 0x9E3779B9u;
      b += 0xBB67AE85u;
    }
  }
};

// A uniform value in [0, 1) for position `i`: the third word of the
// Philox block of counter i.
inline double uniform_at(const Philox& rng, uint64_t i) {
  uint32_t c[4] = {uint32_t(i), uint32_t(i >> 32), 0, 0};
  rng(c);
  return double(c[2]) / 4294967296.0;
}

// A standard normal value for position `i`: Box-Muller over the first two
// words of the Philox block of counter i.
inline double normal_at(const Philox& rng, uint64_t i) {
  uint32_t c[4] = {uint32_t(i), uint32_t(i >> 32), 0, 0};
  rng(c);
  constexpr double kTwo32 = 4294967296.0;
  const double u1 = (double(c[0]) + 1.0) / kTwo32; // (0, 1]
  const double u2 = double(c[1]) / kTwo32; // [0, 1)
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
}

// FNV-1a of the name, mixed with the key: each tensor its own stream.
uint64_t tensor_key(uint64_t key, const std::string& name) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char ch : name) {
    h = (h ^ ch) * 1099511628211ull;
  }
  h ^= key + 0x9E3779B97F4A7C15ull + (h << 6) + (h >> 2);
  return h;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

enum class InitKind { kOnes, kZeros, kNormal, kUniform };

// The initialization rule of a parameter, by name. LoRA (model/lora.h):
// A uniform in +-1/sqrt(fan_in) as PEFT does, B zero.
InitKind init_kind(const std::string& name) {
  if (name.find("lora_") != std::string::npos) {
    return ends_with(name, "_a") ? InitKind::kUniform : InitKind::kZeros;
  }
  const bool bias = ends_with(name, "bias");
  if (name.find("norm") != std::string::npos) {
    return bias ? InitKind::kZeros : InitKind::kOnes;
  }
  if (bias || name.find("noise_weight") != std::string::npos ||
      name.find(".b_gate_up") != std::string::npos ||
      name.find(".b_down") != std::string::npos ||
      name.find(".critic_b") != std::string::npos) {
    return InitKind::kZeros;
  }
  return InitKind::kNormal;
}

} // namespace

c10::Device param_device() {
  return g_param_device;
}

ParamDeviceGuard::ParamDeviceGuard(c10::Device d) : prev_(g_param_device) {
  g_param_device = d;
}

ParamDeviceGuard::~ParamDeviceGuard() {
  g_param_device = prev_;
}

void materialize(torch::nn::Module& m, c10::Device device) {
  // In place: the modules' members and the registry share each parameter's
  // TensorImpl, so it becomes a tensor of `device` with fresh storage
  // (set_data refuses meta -> device; this is what it would do).
  for (auto& p : m.named_parameters()) {
    auto& t = p.value();
    if (!t.is_meta()) {
      continue;
    }
    const auto fresh = at::empty(t.sizes(), t.options().device(device));
    auto* impl = t.unsafeGetTensorImpl();
    impl->_change_backend_component_keys(device);
    impl->set_storage_keep_dtype(fresh.storage());
    impl->set_sizes_and_strides(fresh.sizes(), fresh.strides());
    impl->set_storage_offset(0);
  }
}

// Values by position: U(low, high), or N(0, high) (`uniform` false).
void fill_by_position(
    at::Tensor& t,
    double low,
    double high,
    uint64_t key,
    const std::string& name,
    const parallel::Piece& piece,
    at::IntArrayRef full,
    bool uniform) {
  at::NoGradGuard g;
  const uint64_t k = tensor_key(key, name);
  const Philox rng{uint32_t(k), uint32_t(k >> 32)};
  // The piece as [outer, rows, inner] over the full tensor's
  // [outer, n, inner]: rows come from the piece's ranges along the split.
  const int64_t d = piece.whole() ? 0 : piece.split.dim;
  const int64_t n = full.empty() ? 1 : full[d];
  int64_t outer = 1, inner = 1;
  for (int64_t i = 0; i < static_cast<int64_t>(full.size()); ++i) {
    if (i < d) {
      outer *= full[i];
    } else if (i > d) {
      inner *= full[i];
    }
  }
  std::vector<int64_t> row_of; // the full row of each piece row
  for (const auto& [a, b] : piece.ranges(n)) {
    for (int64_t r = a; r < b; ++r) {
      row_of.push_back(r);
    }
  }
  const int64_t rows = static_cast<int64_t>(row_of.size());
  TORCH_CHECK(
      outer * rows * inner == t.numel(),
      "init: parameter '",
      name,
      "' has ",
      t.numel(),
      " elements, its piece of the full shape ",
      full,
      " has ",
      outer * rows * inner);
  TORCH_CHECK(
      t.is_contiguous(), "init: parameter '", name, "' is not contiguous");
  auto dst = t.view({outer * rows, inner});
  // In blocks of about 8M values: the float64 buffer stays small.
  const int64_t block =
      std::max<int64_t>(1, (int64_t(1) << 23) / std::max<int64_t>(inner, 1));
  for (int64_t q0 = 0; q0 < outer * rows; q0 += block) {
    const int64_t len = std::min(block, outer * rows - q0);
    auto buf = at::empty({len, inner}, at::kDouble);
    double* o = buf.data_ptr<double>();
    at::parallel_for(0, len, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t q = lo; q < hi; ++q) {
        const int64_t row = q0 + q;
        const uint64_t base =
            (uint64_t(row / rows) * n + row_of[row % rows]) * uint64_t(inner);
        for (int64_t j = 0; j < inner; ++j) {
          o[q * inner + j] =
              uniform ? low + (high - low) * uniform_at(rng, base + j)
                      : high * normal_at(rng, base + j);
        }
      }
    });
    dst.narrow(0, q0, len).copy_(buf);
  }
}

void fill_normal(
    at::Tensor& t,
    double std,
    uint64_t key,
    const std::string& name,
    const parallel::Piece& piece,
    at::IntArrayRef full) {
  fill_by_position(t, 0, std, key, name, piece, full, false);
}

void fill_uniform(
    at::Tensor& t,
    double low,
    double high,
    uint64_t key,
    const std::string& name,
    const parallel::Piece& piece,
    at::IntArrayRef full) {
  fill_by_position(t, low, high, key, name, piece, full, true);
}

void init_parameters(
    TransformerImpl& model,
    double std,
    uint64_t key,
    const PieceOf& piece_of,
    const std::function<bool(const std::string&)>& only) {
  at::NoGradGuard g;
  for (auto& p : model.named_parameters()) {
    const auto& name = p.key();
    auto& t = p.value();
    if (t.is_meta() || (only && !only(name))) {
      continue; // shapes only: materialized and filled later
    }
    switch (init_kind(name)) {
      case InitKind::kOnes:
        t.fill_(1.0);
        continue;
      case InitKind::kZeros:
        t.zero_();
        continue;
      case InitKind::kNormal:
      case InitKind::kUniform:
        break;
    }
    const auto piece = piece_of ? piece_of(name) : parallel::Piece{};
    auto full = t.sizes().vec();
    if (!piece.whole()) {
      full[piece.split.dim] *= piece.count;
    }
    if (init_kind(name) == InitKind::kUniform) {
      const double bound = 1.0 / std::sqrt(static_cast<double>(full.back()));
      fill_uniform(t, -bound, bound, key, name, piece, full);
    } else {
      fill_normal(t, std, key, name, piece, full);
    }
  }
}

uint64_t init_key_from_default_generator() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get<at::CPUGeneratorImpl>()->random64();
}

} // namespace moeyard
