# LibTorch from the PyPI torch wheel, as imported targets torch::cpu and
# torch::python.
#
# Why not find_package(Torch): the PyPI wheel is built with CUDA, and its
# TorchConfig then insists on a CUDA compiler that can build C++20 and probes
# the GPUs with try_run. A CPU build must work on machines without either, so
# we locate the wheel through torch.utils.cmake_prefix_path (as TorchConfig
# would) and describe its headers and libraries ourselves.

execute_process(
  COMMAND ${Python3_EXECUTABLE} -c
    "import torch, torch.utils; print(torch.utils.cmake_prefix_path); print(int(torch._C._GLIBCXX_USE_CXX11_ABI)); print(torch.__version__)"
  OUTPUT_VARIABLE _torch_info OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE _torch_rc)
if(NOT _torch_rc EQUAL 0)
  message(FATAL_ERROR
    "moeyard: cannot import torch with ${Python3_EXECUTABLE}. "
    "Run scripts/setup.sh, or pass -DPython3_EXECUTABLE=<python with torch>.")
endif()
string(REPLACE "\n" ";" _torch_info "${_torch_info}")
list(GET _torch_info 0 TORCH_CMAKE_PREFIX)
list(GET _torch_info 1 TORCH_CXX11_ABI)
list(GET _torch_info 2 TORCH_VERSION)
get_filename_component(TORCH_ROOT "${TORCH_CMAKE_PREFIX}/../.." ABSOLUTE)
set(TORCH_LIB_DIR "${TORCH_ROOT}/lib")
message(STATUS "moeyard: torch ${TORCH_VERSION} at ${TORCH_ROOT}")

foreach(_lib c10 torch_cpu torch_python)
  find_library(_path_${_lib} ${_lib} PATHS "${TORCH_LIB_DIR}" NO_DEFAULT_PATH REQUIRED)
endforeach()

add_library(torch::cpu INTERFACE IMPORTED)
target_include_directories(torch::cpu SYSTEM INTERFACE
  "${TORCH_ROOT}/include" "${TORCH_ROOT}/include/torch/csrc/api/include")
target_link_libraries(torch::cpu INTERFACE "${_path_torch_cpu}" "${_path_c10}")
target_compile_definitions(torch::cpu INTERFACE _GLIBCXX_USE_CXX11_ABI=${TORCH_CXX11_ABI})

add_library(torch::python INTERFACE IMPORTED)
target_link_libraries(torch::python INTERFACE torch::cpu "${_path_torch_python}")
