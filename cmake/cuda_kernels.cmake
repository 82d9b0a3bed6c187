# GPU kernels: one object library of tier-1 (mma.sync, sm80+) instantiations, compiled for
# every architecture in RINGATTN_CUDA_ARCHS (sm80 SASS does not run on Hopper, so tier 1 is
# built for 90a too), plus the host dispatch. Static cudart: the .so needs only the driver.
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)
set(CMAKE_CUDA_STANDARD 17)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)

set(_ringattn_cuda_archs "")
set(_ringattn_arch_numbers "")
foreach(arch IN LISTS RINGATTN_CUDA_ARCHS)
  if(NOT arch MATCHES "^(80|86|89|90|90a)$")
    message(FATAL_ERROR "RINGATTN_CUDA_ARCHS: unsupported architecture '${arch}' (expected some of 80;86;89;90a)")
  endif()
  list(APPEND _ringattn_cuda_archs "${arch}-real")
  string(REGEX REPLACE "a$" "" _num "${arch}")
  list(APPEND _ringattn_arch_numbers "${_num}")
endforeach()
set(_ringattn_arch_defs "")
foreach(num IN LISTS _ringattn_arch_numbers)
  list(APPEND _ringattn_arch_defs RINGATTN_CUDA_ARCH_${num})
endforeach()

set(_ringattn_cuda_flags --expt-relaxed-constexpr -lineinfo)
if(RINGATTN_PTXAS_VERBOSE)
  list(APPEND _ringattn_cuda_flags -Xptxas=-v)
endif()

set(_ringattn_inst_sources "")
set(_ringattn_hdim_defs "")
foreach(hdim IN LISTS RINGATTN_HEAD_DIMS)
  if(NOT hdim MATCHES "^(64|128|256)$")
    message(FATAL_ERROR "RINGATTN_HEAD_DIMS: unsupported head dim '${hdim}' (expected some of 64;128;256)")
  endif()
  list(APPEND _ringattn_hdim_defs RINGATTN_HDIM_${hdim})
  file(GLOB _f CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/sm80/instantiations/fwd_hdim${hdim}_*.cu)
  list(APPEND _ringattn_inst_sources ${_f})
  file(GLOB _f CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/sm80/instantiations/bwd_hdim${hdim}_*.cu)
  list(APPEND _ringattn_inst_sources ${_f})
endforeach()

add_library(ringattn_cuda OBJECT
  csrc/cuda/device_support.cu
  csrc/cuda/workspace.cu
  csrc/cuda/fwd_dispatch.cu
  csrc/cuda/bwd_dispatch.cu
  csrc/cuda/kernel_registry.cu
  csrc/cuda/tile_scheduler.cu
  csrc/cuda/bwd_scheduler.cu
  csrc/cuda/bwd_prepost.cu
  ${_ringattn_inst_sources})
set_target_properties(ringattn_cuda PROPERTIES
  CUDA_ARCHITECTURES "${_ringattn_cuda_archs}"
  POSITION_INDEPENDENT_CODE ON
  CUDA_VISIBILITY_PRESET hidden)
target_include_directories(ringattn_cuda PRIVATE
  ${CMAKE_CURRENT_SOURCE_DIR}/include ${CMAKE_CURRENT_SOURCE_DIR}/csrc)
target_compile_definitions(ringattn_cuda PRIVATE
  ${_ringattn_hdim_defs} ${_ringattn_arch_defs})
target_compile_options(ringattn_cuda PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:${_ringattn_cuda_flags}>)

# Tier 2 (sm90a: TMA + wgmma): its own object library compiled for 90a only (wgmma and setmaxnreg
# exist only there), built when RINGATTN_CUDA_ARCHS lists 90a.
# The tier-2 host code looks cuTensorMapEncodeTiled up with cudaGetDriverEntryPointByVersion
# (CUDA 12.5+).
set(_ringattn_tier2 OFF)
if("90a" IN_LIST RINGATTN_CUDA_ARCHS)
  if(CUDAToolkit_VERSION VERSION_LESS 12.5)
    message(WARNING "ringattn: CUDA ${CUDAToolkit_VERSION} < 12.5: building WITHOUT the tier-2 (sm90a) kernels; "
                    "H100/H200 will run tier 1 (about half the speed). Use CUDA 12.5 or newer for tier 2.")
  else()
    set(_ringattn_tier2 ON)
  endif()
endif()
if(_ringattn_tier2)
  set(_ringattn_sm90_sources csrc/cuda/sm90/tma_host.cu)
  foreach(hdim IN LISTS RINGATTN_HEAD_DIMS)
    file(GLOB _f CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/sm90/instantiations/fwd_hdim${hdim}_*.cu
         ${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/sm90/instantiations/bwd_hdim${hdim}_*.cu
         ${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/sm90/instantiations/bwd_dq_hdim${hdim}_*.cu)
    list(APPEND _ringattn_sm90_sources ${_f})
  endforeach()
  add_library(ringattn_cuda_sm90 OBJECT ${_ringattn_sm90_sources})
  set_target_properties(ringattn_cuda_sm90 PROPERTIES
    CUDA_ARCHITECTURES "90a-real"
    POSITION_INDEPENDENT_CODE ON
    CUDA_VISIBILITY_PRESET hidden)
  target_include_directories(ringattn_cuda_sm90 PRIVATE
    ${CMAKE_CURRENT_SOURCE_DIR}/include ${CMAKE_CURRENT_SOURCE_DIR}/csrc)
  target_compile_definitions(ringattn_cuda_sm90 PRIVATE ${_ringattn_hdim_defs} ${_ringattn_arch_defs})
  target_compile_options(ringattn_cuda_sm90 PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:${_ringattn_cuda_flags}>)
  target_compile_definitions(ringattn_cuda PRIVATE RINGATTN_SM90_TIER)
  target_sources(ringattn PRIVATE $<TARGET_OBJECTS:ringattn_cuda_sm90>)
  message(STATUS "ringattn: tier 2 (sm90a) forward and backward kernels built")
endif()

target_sources(ringattn PRIVATE $<TARGET_OBJECTS:ringattn_cuda>)
target_link_libraries(ringattn PRIVATE CUDA::cudart_static)
# The shared library compiles no CUDA source itself, but the Makefile generators still ask every
# target that links CUDA objects for its architectures ("CUDA_ARCHITECTURES is empty").
set_target_properties(ringattn PROPERTIES CUDA_ARCHITECTURES "${_ringattn_cuda_archs}")
message(STATUS "ringattn: CUDA archs ${_ringattn_cuda_archs}, head dims ${RINGATTN_HEAD_DIMS}")
