# libringattn_torch: the C++ kernels of the torch.ops.ring_flash_attn ops over PyTorch's stable
# ABI (csrc/torch_shim). Built next to libringattn when RINGATTN_BUILD_TORCH_SHIM is ON, or AUTO
# and the configured Python (Python_EXECUTABLE; scikit-build-core passes the one pip runs) imports
# a torch >= 2.10 that ships the stable ABI headers. It links only libringattn and libtorch_cpu's
# C shim, so one build serves every PyTorch from 2.10 on; the Python package falls back to its
# ctypes path wherever it cannot load it.

set(_shim_reason "")
if(NOT Python_EXECUTABLE)
  find_package(Python COMPONENTS Interpreter QUIET)
endif()
if(NOT Python_EXECUTABLE)
  set(_shim_reason "no Python interpreter found (set Python_EXECUTABLE)")
else()
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
            "import os, torch; print(os.path.dirname(torch.__file__)); print(torch.__version__.split('+')[0])"
    OUTPUT_VARIABLE _shim_torch_out
    ERROR_QUIET
    RESULT_VARIABLE _shim_torch_rc
    OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT _shim_torch_rc EQUAL 0)
    set(_shim_reason "${Python_EXECUTABLE} cannot import torch")
  else()
    string(REPLACE "\n" ";" _shim_torch_out "${_shim_torch_out}")
    list(GET _shim_torch_out 0 RINGATTN_TORCH_DIR)
    list(GET _shim_torch_out 1 _shim_torch_version)
    find_library(RINGATTN_TORCH_CPU_LIBRARY NAMES torch_cpu PATHS "${RINGATTN_TORCH_DIR}/lib" NO_DEFAULT_PATH)
    if(_shim_torch_version VERSION_LESS 2.10)
      set(_shim_reason "torch ${_shim_torch_version} is older than 2.10 (the stable ABI's list arguments)")
    elseif(NOT EXISTS "${RINGATTN_TORCH_DIR}/include/torch/csrc/stable/library.h"
           OR NOT EXISTS "${RINGATTN_TORCH_DIR}/include/torch/csrc/stable/c/shim.h")
      set(_shim_reason "torch ${_shim_torch_version} at ${RINGATTN_TORCH_DIR} has no stable ABI headers")
    elseif(NOT RINGATTN_TORCH_CPU_LIBRARY)
      set(_shim_reason "no libtorch_cpu in ${RINGATTN_TORCH_DIR}/lib")
    endif()
  endif()
endif()

if(_shim_reason)
  if(RINGATTN_BUILD_TORCH_SHIM STREQUAL "ON")
    message(FATAL_ERROR "RINGATTN_BUILD_TORCH_SHIM=ON, but: ${_shim_reason}")
  endif()
  message(STATUS "libringattn_torch: not built (${_shim_reason}); the Python package uses its ctypes path")
  return()
endif()

message(STATUS "libringattn_torch: building against torch ${_shim_torch_version} at ${RINGATTN_TORCH_DIR}")
add_library(ringattn_torch SHARED csrc/torch_shim/torch_shim.cpp)
target_include_directories(ringattn_torch PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/csrc)
target_include_directories(ringattn_torch SYSTEM PRIVATE "${RINGATTN_TORCH_DIR}/include")
# The oldest PyTorch whose stable ABI the shim uses (see csrc/torch_shim/torch_shim.cpp): 2.10.
target_compile_definitions(ringattn_torch PRIVATE TORCH_TARGET_VERSION=0x020a000000000000)
# libtorch_cpu by its SONAME and without a run path: inside Python it is the one torch loaded.
target_link_libraries(ringattn_torch PRIVATE ringattn "${RINGATTN_TORCH_CPU_LIBRARY}" ${CMAKE_DL_LIBS})
set_target_properties(ringattn_torch PROPERTIES
  INSTALL_RPATH "$ORIGIN"  # libringattn sits next to it in the installed package
  SKIP_BUILD_RPATH OFF)
if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
  target_compile_options(ringattn_torch PRIVATE -Wall -Wextra)
endif()
set(RINGATTN_TORCH_SHIM_BUILT ON)
