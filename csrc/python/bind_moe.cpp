// moeyard._C's MoE interface: the rows of csrc/model/moe_interface.h for
// nn.MoE, MoEResult and the docs, the options' checks, and the
// expert-parallel hooks for multi-process tests.

#include <optional>

#include "model/config.h"
#include "parallel/process_group.h"
#include "python/bindings.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace moeyard::python {

// The op's outputs beyond y (moe_interface.h's rows), plus dead_experts.
py::dict moe_stats(const MoEOutput& o) {
  py::dict d;
#define MOEYARD_PUT(name, ...) d[#name] = o.name;
  MOEYARD_MOE_AUX_LOSSES(MOEYARD_PUT)
  MOEYARD_MOE_STATISTICS(MOEYARD_PUT)
#undef MOEYARD_PUT
  d["dead_experts"] = (o.tokens_per_expert == 0).sum();
  d["indices"] = o.indices;
  return d;
}

namespace {

// MoEOptions from keyword arguments named as the table's options; unknown
// names and wrong types are errors naming them.
MoEOptions moe_options_from(const py::dict& kw) {
  MoEOptions o;
  size_t used = 0;
  for_each_moe_option(o, [&](const char* name, auto& v, const auto&) {
    if (!kw.contains(name)) {
      return;
    }
    ++used;
    try {
      v = kw[name].cast<std::decay_t<decltype(v)>>();
    } catch (const py::cast_error&) {
      throw py::type_error(
          std::string("MoE option ") + name + ": wrong type, got " +
          py::str(kw[name].get_type()).cast<std::string>());
    }
  });
  if (used != kw.size()) {
    std::string known;
    for_each_moe_option(o, [&](const char* name, auto&, const auto&) {
      known += (known.empty() ? "" : ", ") + std::string(name);
    });
    for (const auto& item : kw) {
      const auto k = item.first.cast<std::string>();
      bool found = false;
      for_each_moe_option(
          o, [&](const char* name, auto&, const auto&) { found |= k == name; });
      if (!found) {
        throw py::type_error(
            "MoE: unknown option '" + k + "'; options: " + known);
      }
    }
  }
  return o;
}

// The rows of moe_interface.h, for nn.MoE, MoEResult and the docs.
py::dict moe_interface() {
  using namespace moe_spec;
  const MoEOptions defaults;
  auto row = [](const char* name,
                const char* type,
                py::object def,
                const Allowed& a,
                const char* doc) {
    py::dict r;
    r["name"] = name;
    r["type"] = type;
    r["default"] = def;
    r["doc"] = doc;
    r["choices"] = a.choices ? py::cast(choices_of(a)) : py::none();
    r["range"] = std::string(type) == "int" || std::string(type) == "float" ||
                         std::string(type) == "list[int]"
                     ? py::cast(a.range.str())
                     : py::none();
    return r;
  };
  auto type_name = [](const auto& v) {
    using T = std::decay_t<decltype(v)>;
    if constexpr (std::is_same_v<T, bool>) {
      return "bool";
    } else if constexpr (std::is_same_v<T, int64_t>) {
      return "int";
    } else if constexpr (std::is_same_v<T, double>) {
      return "float";
    } else if constexpr (std::is_same_v<T, std::string>) {
      return "str";
    } else {
      return "list[int]";
    }
  };
  py::list options, coefficients, structure, outputs, weights;
#define MOEYARD_ROW(type, name, def, allowed, doc) \
  options.append(                                  \
      row(#name,                                   \
          type_name(defaults.name),                \
          py::cast(defaults.name),                 \
          allowed,                                 \
          doc));
  MOEYARD_MOE_OPTIONS(MOEYARD_ROW)
#undef MOEYARD_ROW
#define MOEYARD_ROW(loss, coeff, def, doc) \
  coefficients.append(                     \
      row(#coeff,                          \
          "float",                         \
          py::cast(defaults.coeff),        \
          at_least(0),                     \
          "weight of `" #loss "` in the model's loss"));
  MOEYARD_MOE_AUX_LOSSES(MOEYARD_ROW)
#undef MOEYARD_ROW
  const MoEConfig moe;
#define MOEYARD_ROW(type, name, def, allowed, doc) \
  structure.append(                                \
      row(#name, type_name(moe.name), py::cast(moe.name), allowed, doc));
  MOEYARD_MOE_STRUCTURE(MOEYARD_ROW)
#undef MOEYARD_ROW
  auto output = [&](const char* name,
                    const char* kind,
                    py::object coeff,
                    const char* doc) {
    outputs.append(py::dict(
        "name"_a = name,
        "kind"_a = kind,
        "coefficient"_a = coeff,
        "doc"_a = doc));
  };
  output("y", "tensor", py::none(), "the layer's output, shape of x");
#define MOEYARD_ROW(loss, coeff, def, doc) \
  output(#loss, "aux_loss", py::str(#coeff), doc);
  MOEYARD_MOE_AUX_LOSSES(MOEYARD_ROW)
#undef MOEYARD_ROW
#define MOEYARD_ROW(name, combine, length, doc) \
  output(#name, "statistic", py::none(), doc);
  MOEYARD_MOE_STATISTICS(MOEYARD_ROW)
#undef MOEYARD_ROW
  output(
      "indices",
      "tensor",
      py::none(),
      "token choice: [T, K] experts (-1 = padding); expert choice: [E, C] "
      "tokens");
#define MOEYARD_ROW(name, required, doc)                   \
  weights.append(py::dict(                                 \
      "name"_a = #name,                                    \
      "required"_a = std::string(#required) == "required", \
      "doc"_a = doc));
  MOEYARD_MOE_WEIGHTS(MOEYARD_ROW)
#undef MOEYARD_ROW
  return py::dict(
      "options"_a = options,
      "coefficients"_a = coefficients,
      "structure"_a = structure,
      "outputs"_a = outputs,
      "weights"_a = weights);
}

} // namespace

void bind_moe(py::module_& m) {
  // Expert parallelism from Python, for multi-process tests under torchrun:
  // one expert-parallel group over every process of the launch.
  static std::optional<parallel::Group> ep_group;
  m.def(
      "_ep_init",
      [](double timeout_s) {
        namespace par = parallel;
        const auto env = par::LaunchEnv::from_env();
        const auto timeout =
            std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
        ep_group = par::make_world_group(env, "expert_parallel", timeout);
        return py::make_tuple(env.rank, env.world_size);
      },
      py::arg("timeout_s") = 60.0);
  m.def(
      "_moe_forward_ep",
      [](const at::Tensor& x,
         const at::Tensor& router_weight,
         const at::Tensor& w_gate_up,
         const at::Tensor& w_down,
         const std::optional<at::Tensor>& b_gate_up,
         const std::optional<at::Tensor>& b_down,
         const py::kwargs& options) {
        TORCH_CHECK(
            ep_group.has_value(), "_moe_forward_ep: call _ep_init first");
        MoEWeights w;
        w.router_weight = router_weight;
        w.w_gate_up = w_gate_up;
        w.w_down = w_down;
        w.b_gate_up = b_gate_up.value_or(at::Tensor());
        w.b_down = b_down.value_or(at::Tensor());
        auto o = moe_options_from(options);
        o.expert_group = &*ep_group;
        auto out = moe_forward(x, w, o);
        return py::make_tuple(out.y, out.indices);
      },
      py::arg("x"),
      py::arg("router_weight"),
      py::arg("w_gate_up"),
      py::arg("w_down"),
      py::arg("b_gate_up") = py::none(),
      py::arg("b_down") = py::none());

  // The MoE layer's interface (csrc/model/moe_interface.h).
  m.def(
      "moe_interface",
      &moe_interface,
      "the MoE layer's weights, options, aux-loss coefficients, structure "
      "keys and outputs, one dict per row");
  m.def(
      "check_moe_options",
      [](int64_t num_experts, const py::kwargs& options) {
        try {
          check_moe_options(moe_options_from(options), num_experts, "MoE");
        } catch (const c10::Error& e) {
          throw py::value_error(e.what_without_backtrace());
        }
      },
      py::arg("num_experts"),
      "ValueError unless every option is valid for num_experts experts");
}

} // namespace moeyard::python
