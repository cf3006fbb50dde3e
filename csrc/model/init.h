#pragma once
// Building a model without memory, and initializing only what a rank owns.
//
// - ParamDeviceGuard: while one lives, the model's modules create their
//   parameters on its device (meta: shapes only). A model built on meta is
//   cut to a rank's pieces (TransformerImpl::shard) and then materialized
//   on the rank's device: no rank ever allocates what it does not own.
// - The initialization is a pure function of (key, parameter name, position
//   in the full tensor): normal values from a counter-based generator
//   (Philox4x32-10 with Box-Muller), so a piece gets exactly the values of
//   those positions of the whole tensor, whatever the layout that cut it.

#include <c10/core/Device.h>
#include <c10/core/TensorOptions.h>
#include <torch/nn/module.h>

#include <functional>
#include <string>

#include "parallel/piece.h"

namespace moeyard {

class TransformerImpl;

// The device new parameters are created on (CPU by default).
c10::Device param_device();

class ParamDeviceGuard {
 public:
  explicit ParamDeviceGuard(c10::Device d);
  ~ParamDeviceGuard();
  ParamDeviceGuard(const ParamDeviceGuard&) = delete;
  ParamDeviceGuard& operator=(const ParamDeviceGuard&) = delete;

 private:
  c10::Device prev_;
};

// Options of a new parameter of dtype `dt`: on param_device().
inline at::TensorOptions param_options(at::ScalarType dt) {
  return at::TensorOptions().dtype(dt).device(param_device());
}

// Gives every meta parameter of `m` uninitialized storage on `device`.
void materialize(torch::nn::Module& m, c10::Device device);

// Where a parameter's piece sits in the full tensor (whole: every rank
// holds it all).
using PieceOf = std::function<parallel::Piece(const std::string& name)>;

// Fills `t` (piece `piece` of a tensor of full shape `full`) with the
// N(0, std) values the whole tensor has at those positions under `key`
// and `name`.
void fill_normal(
    at::Tensor& t,
    double std,
    uint64_t key,
    const std::string& name,
    const parallel::Piece& piece,
    at::IntArrayRef full);

// U(low, high) values by position, as fill_normal.
void fill_uniform(
    at::Tensor& t,
    double low,
    double high,
    uint64_t key,
    const std::string& name,
    const parallel::Piece& piece,
    at::IntArrayRef full);

// The model's initialization: norms' weights 1, biases and zero-init
// tensors 0, LoRA factors A U(+-1/sqrt(fan_in)) and B 0, every other tensor
// N(0, std), values by position (fill_normal, fill_uniform), each parameter
// being piece `piece_of(name)` of its full tensor (whole when piece_of is
// empty); only the parameters `only` accepts (all when empty).
void init_parameters(
    TransformerImpl& model,
    double std,
    uint64_t key,
    const PieceOf& piece_of = {},
    const std::function<bool(const std::string&)>& only = {});

// A key drawn from the default CPU generator (torch.manual_seed and
// train.seed decide it).
uint64_t init_key_from_default_generator();

} // namespace moeyard
