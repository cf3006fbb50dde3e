// moeyard._C: loading this module loads libmoeyard, whose static registrars
// define torch.ops.moeyard.*. Model and trainer bindings join here later.

#include <pybind11/pybind11.h>

#include "version.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "moeyard native library";
  m.attr("__version__") = moeyard::kVersion;
}
