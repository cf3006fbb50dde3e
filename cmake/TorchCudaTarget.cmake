# The imported target torch::cuda: the torch wheel's CUDA libraries
# (_path_torch_cuda, _path_c10_cuda, found beside its CPU ones) with the
# toolkit's runtime and cuBLAS. Used by moeyard's build (Cuda.cmake) and by
# find_package(moeyard) of a CUDA build.

find_library(_path_torch_cuda torch_cuda PATHS "${TORCH_LIB_DIR}" NO_DEFAULT_PATH REQUIRED)
find_library(_path_c10_cuda c10_cuda PATHS "${TORCH_LIB_DIR}" NO_DEFAULT_PATH REQUIRED)
add_library(torch::cuda INTERFACE IMPORTED)
target_link_libraries(torch::cuda INTERFACE
  torch::cpu "${_path_torch_cuda}" "${_path_c10_cuda}" CUDA::cudart CUDA::cublas)
# libtorch_cuda needs the CUDA libraries of the nvidia-* wheels (NCCL, cuDNN,
# ...): let the linker find them there rather than older system copies.
get_filename_component(_site "${TORCH_ROOT}/.." ABSOLUTE)
file(GLOB _nv_lib_dirs LIST_DIRECTORIES true "${_site}/nvidia/*/lib")
foreach(_d ${_nv_lib_dirs})
  target_link_options(torch::cuda INTERFACE "LINKER:-rpath-link,${_d}")
endforeach()
