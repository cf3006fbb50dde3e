# CUDA for the kernels in kernels/ and csrc/ops/*/cuda/.
# MOEYARD_WITH_CUDA=AUTO turns it on when nvcc is found and the torch wheel
# was built with CUDA; ON requires both; OFF skips. Sets MOEYARD_CUDA and,
# when on, the imported target torch::cuda.

set(MOEYARD_CUDA OFF)
if(MOEYARD_WITH_CUDA STREQUAL "OFF")
  return()
endif()

execute_process(
  COMMAND ${Python3_EXECUTABLE} -c "import torch; print(torch.version.cuda or '')"
  OUTPUT_VARIABLE TORCH_CUDA_VERSION OUTPUT_STRIP_TRAILING_WHITESPACE)
find_library(_path_torch_cuda torch_cuda PATHS "${TORCH_LIB_DIR}" NO_DEFAULT_PATH)
find_library(_path_c10_cuda c10_cuda PATHS "${TORCH_LIB_DIR}" NO_DEFAULT_PATH)
if(NOT CMAKE_CUDA_COMPILER)
  find_program(CMAKE_CUDA_COMPILER nvcc PATHS /usr/local/cuda/bin)
endif()

set(_why "")
if(NOT CMAKE_CUDA_COMPILER)
  set(_why "nvcc not found")
elseif(TORCH_CUDA_VERSION STREQUAL "" OR NOT _path_torch_cuda OR NOT _path_c10_cuda)
  set(_why "torch ${TORCH_VERSION} was built without CUDA")
endif()
if(_why)
  if(MOEYARD_WITH_CUDA STREQUAL "ON")
    message(FATAL_ERROR "moeyard: MOEYARD_WITH_CUDA=ON but ${_why}")
  endif()
  message(STATUS "moeyard: CUDA kernels off (${_why})")
  return()
endif()

# SASS for each architecture, PTX of the last for forward compatibility.
set(_archs "")
foreach(_a ${MOEYARD_CUDA_ARCHS})
  list(APPEND _archs "${_a}-real")
endforeach()
list(GET MOEYARD_CUDA_ARCHS -1 _last)
list(APPEND _archs "${_last}-virtual")
set(CMAKE_CUDA_ARCHITECTURES "${_archs}")
set(CMAKE_CUDA_STANDARD 20)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
set(CMAKE_CUDA_HOST_COMPILER ${CMAKE_CXX_COMPILER})
if(CCACHE_PROGRAM)
  set(CMAKE_CUDA_COMPILER_LAUNCHER ${CCACHE_PROGRAM})
endif()
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)

string(REGEX MATCH "^[0-9]+" _torch_cuda_major "${TORCH_CUDA_VERSION}")
if(NOT _torch_cuda_major STREQUAL CUDAToolkit_VERSION_MAJOR)
  message(WARNING
    "moeyard: torch was built with CUDA ${TORCH_CUDA_VERSION} but the toolkit is "
    "${CUDAToolkit_VERSION}; install a torch whose CUDA major version matches")
endif()

include("${CMAKE_CURRENT_LIST_DIR}/TorchCudaTarget.cmake")
set(MOEYARD_CUDA ON)
message(STATUS "moeyard: CUDA kernels on (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, "
  "torch CUDA ${TORCH_CUDA_VERSION}, archs ${CMAKE_CUDA_ARCHITECTURES})")
