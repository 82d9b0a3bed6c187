#!/usr/bin/env python3
"""Writes the compiled-kernel set of the CUDA backend from one table (KERNELS x DTYPES x each kernel
set's VARIANTS, a variant being a mask mode and whether the softcap is compiled in):

* one explicit kernel instantiation per small .cu file (tier, pass, head dim, dtype, variant)
  under csrc/cuda/sm80/instantiations/ and csrc/cuda/sm90/instantiations/, so builds parallelise
  and a change rebuilds little (cmake/cuda_kernels.cmake picks the files of the head dims in
  RINGATTN_HEAD_DIMS);
* csrc/cuda/kernel_registry.cu: the dispatch tables from (dtype, head dim, variant) to those
  kernels and their lookup functions (declared in csrc/cuda/kernel_registry.h), each head dim's
  rows under the RINGATTN_HDIM_<D> define CMake sets for the head dims it builds.

Run after changing a table; --check tells whether the committed files are up to date
(gen_common.py; test/test_generated_cpu.py runs it).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import gen_common

ME = "scripts/dev/gen_instantiations.py"
REGISTRY = "csrc/cuda/kernel_registry.cu"


@dataclass(frozen=True)
class Launch:
    """One kernel's launch function, written into its instantiation file: it instantiates
    `kernel<traits, mask mode, softcap>` and launches it with the traits' threads and shared memory."""
    # "fwd", "bwd_dkdv", "bwd_dq": the kernel is the __global__ function template grouped_<what>_kernel
    # (of its kernel header), its launch functions launch_<what>_*, both in the tier's namespace.
    what: str
    traits: str  # a str.format pattern over {element} and {hdim}, in the tier's namespace
    params: str  # the kernel parameter struct, in the tier's namespace
    # All of the unified L1/shared memory as shared memory (launch.h), where two CTAs need it.
    max_shared_carveout: bool = False
    # A function template (of the kernel header) that picks and launches the kernel itself,
    # `launcher<traits, mask mode, softcap>(params, num_ctas, stream)`; empty: the launch function
    # launches grouped_<what>_kernel.
    launcher: str = ""

    def function(self, hdim: int, dtype: "Dtype", variant: "Variant") -> str:
        """The launch function of one (head dim, dtype, variant), in the tier's namespace."""
        return f"launch_{self.what}_hdim{hdim}_{dtype.name}{variant.suffix}"

    def declaration(self, hdim: int, dtype: "Dtype", variant: "Variant") -> str:
        """Its signature (without the terminating ; or body)."""
        return (f"cudaError_t {self.function(hdim, dtype, variant)}(const {self.params}& params, int num_ctas, "
                f"cudaStream_t stream)")


@dataclass(frozen=True)
class Dtype:
    name: str  # in file names
    element: str  # C++ element type
    abi: str  # ringattn.h dtype constant


@dataclass(frozen=True)
class Variant:
    """A mask mode (csrc/common/mask.h) and whether the kernel applies the logit softcap."""
    suffix: str  # in file names
    mode: str  # MaskMode enumerator
    softcap: bool = False  # the launch's `bool kSoftcap` template argument (written only when true)

    def template_args(self) -> str:
        """The kernel's template arguments after the traits."""
        return f"MaskMode::{self.mode}, {str(self.softcap).lower()}"


DTYPES = (Dtype("fp16", "__half", "RINGATTN_DTYPE_FP16"), Dtype("bf16", "__nv_bfloat16", "RINGATTN_DTYPE_BF16"))

# The variants a kernel set is built for. A new mask mode is one row here (and its MaskMode).
# kNone and kCausal are the fixed masks of most calls. kLocal takes a run-time window and diagonal
# shift and reads the sinks, so it serves every call that uses one of the optional features. The
# softcap is a compile-time flag of kLocal only: a softcapped call runs kLocal whatever its window
# (the fixed masks would only save the run-time window test, which costs little next to the
# tanh), which adds one variant per (pass, head dim, dtype) instead of three.
FIXED_MASKS = (Variant("", "kNone"), Variant("_causal", "kCausal"))
LOCAL_MASKS = (Variant("_local", "kLocal"), Variant("_local_softcap", "kLocal", softcap=True))
ALL_VARIANTS = FIXED_MASKS + LOCAL_MASKS


@dataclass(frozen=True)
class KernelSet:
    """A (tier, pass) whose kernels are built for each of its head dims, each dtype, each of its variants."""
    title: str  # the registry table's comment
    tier: str  # "sm80" (tier 1, mma.sync) or "sm90" (tier 2, sm90a): namespace, folder, file suffix
    pass_name: str  # file name prefix
    head_dims: tuple[int, ...]
    kernel_headers: tuple[str, ...]  # what an instantiation file includes
    declarations: tuple[str, ...]  # what the registry includes: the launches' declarations, the configs
    launches: tuple[Launch, ...]  # instantiated together in one file
    # A table row is entry_maker(entry_args...) (kernel_registry.h), each a str.format pattern over
    # {dtype}, {mask}, {softcap}, {element}, and {traits<i>} / {launch<i>} of the i-th launch; by
    # default a KernelEntry of the one launch.
    entry_maker: str = "kernel_entry<{traits0}, {mask}, {softcap}>"
    entry_args: tuple[str, ...] = ("{dtype}", "&{launch0}")
    variants: tuple[Variant, ...] = ALL_VARIANTS  # the mask modes / softcap it is built for

    def registry_names(self) -> tuple[str, str, str]:
        """The set's registry table, its row type and its lookup function (kernel_registry.h), named
        after tier and pass: kSm90BwdDqKernels, Sm90BwdDqKernelEntry, find_sm90_bwd_dq_kernel."""
        camel = self.tier.capitalize() + "".join(word.capitalize() for word in self.pass_name.split("_"))
        return f"k{camel}Kernels", f"{camel}KernelEntry", f"find_{self.tier}_{self.pass_name}_kernel"


# The kernel sets. A head dim is one more number in a row's head_dims (and its traits' config).
KERNELS = (
    KernelSet(
        title="Tier-1 (mma.sync, sm80 and newer) forward kernels.",
        tier="sm80", pass_name="fwd", head_dims=(64, 128, 256),
        kernel_headers=("cuda/sm80/fwd_kernel.cuh",), declarations=("cuda/sm80/fwd_traits.h",),
        launches=(Launch("fwd", "FwdConfig<{element}, {hdim}>::Traits", "FwdKernelParams"),)),
    KernelSet(
        title="Tier-1 backward: dK/dV kernel, deterministic-mode dQ kernel, pre/postprocess.",
        tier="sm80", pass_name="bwd", head_dims=(64, 128, 256),
        kernel_headers=("cuda/sm80/bwd_dq_kernel.cuh", "cuda/sm80/bwd_kernel.cuh"),
        declarations=("cuda/bwd_prepost.h", "cuda/sm80/bwd_traits.h"),
        # dK/dV: all of L1 as shared memory, so that two CTAs of the D=128 tile fit on sm_90.
        launches=(Launch("bwd_dkdv", "BwdConfig<{element}, {hdim}>::Traits", "BwdKernelParams",
                         max_shared_carveout=True),
                  Launch("bwd_dq", "BwdConfig<{element}, {hdim}>::DqTraits", "BwdKernelParams")),
        entry_maker="sm80_bwd_entry<{traits0}, {traits1}, {mask}, {softcap}>",
        entry_args=("{dtype}", "&{launch0}", "&{launch1}", "&launch_bwd_preprocess<{element}>",
                    "&launch_bwd_postprocess<{element}>")),
    KernelSet(
        title="Tier-2 (sm90a: TMA + wgmma, warp specialised) forward kernels.",
        tier="sm90", pass_name="fwd", head_dims=(64, 128, 256),
        kernel_headers=("cuda/sm90/fwd_kernel.cuh",), declarations=("cuda/sm90/fwd_params.h", "cuda/sm90/fwd_traits.h"),
        # One CTA per tile, or the persistent grid where the host chose it (launch_grouped_fwd).
        launches=(Launch("fwd", "FwdConfig<{element}, {hdim}>::Traits", "FwdKernelParams",
                         launcher="launch_grouped_fwd"),)),
    # Head dims 64 and 128 run the key-split main loop, 256 the head-split one (bwd_kernel.cuh).
    KernelSet(
        title="Tier-2 backward dK/dV kernels (dQ through TMA reduce-add into dq_accum).",
        tier="sm90", pass_name="bwd", head_dims=(64, 128, 256),
        kernel_headers=("cuda/sm90/bwd_kernel.cuh",), declarations=("cuda/sm90/bwd_traits.h",),
        launches=(Launch("bwd_dkdv", "BwdConfig<{element}, {hdim}>::Traits", "BwdKernelParams"),)),
    KernelSet(
        title="Tier-2 dQ kernels of the deterministic mode.",
        tier="sm90", pass_name="bwd_dq", head_dims=(64, 128, 256),
        kernel_headers=("cuda/sm90/bwd_dq_kernel.cuh",),
        declarations=("cuda/sm90/bwd_dq_traits.h", "cuda/sm90/bwd_params.h"),
        launches=(Launch("bwd_dq", "BwdDqConfig<{element}, {hdim}>::Traits", "BwdDqKernelParams"),)),
)

# The tier-2 tables exist only in builds with the sm90a kernels (cmake/cuda_kernels.cmake).
TIER_GUARD = {"sm90": "RINGATTN_SM90_TIER"}

INSTANTIATION = """// Generated by {me}: do not edit.
{includes}
namespace ringattn {{
namespace cuda {{
namespace {tier} {{
{instantiations}}}  // namespace {tier}
}}  // namespace cuda
}}  // namespace ringattn
"""

REGISTRY_HEADER = """// Generated by {me}: do not edit.
//
// The compiled kernels of the CUDA backend, one table per (tier, pass), and their lookups
// (kernel_registry.h). Each head dim's rows exist when CMake builds that head dim
// (RINGATTN_HEAD_DIMS sets RINGATTN_HDIM_<D>); a table ends with an entry of dtype -1, which
// matches no lookup, so that it is never empty.
#include "cuda/kernel_registry.h"

{includes}
namespace ringattn {{
namespace cuda {{
"""

REGISTRY_FOOTER = """
}  // namespace cuda
}  // namespace ringattn
"""


def instantiation_file(ks: KernelSet, hdim: int, dtype: Dtype, variant: Variant) -> tuple[str, str]:
    """(path, text) of the file that instantiates the kernel(s) of one (kernel set, head dim, dtype,
    variant) and defines their launch functions (declared in the registry)."""
    lines = ""
    for launch in ks.launches:
        traits = launch.traits.format(element=dtype.element, hdim=hdim)
        carveout = str(launch.max_shared_carveout).lower()
        if launch.launcher:
            lines += (f"{launch.declaration(hdim, dtype, variant)} {{\n"
                      f"  return {launch.launcher}<{traits}, {variant.template_args()}>(params, num_ctas, stream);\n"
                      f"}}\n")
            continue
        kernel = f"grouped_{launch.what}_kernel<T, {variant.template_args()}>"
        lines += (f"{launch.declaration(hdim, dtype, variant)} {{\n"
                  f"  using T = {traits};\n"
                  f"  static KernelAttributeCache attributes_set;  // launch.h\n"
                  f"  return launch_with_smem(&{kernel}, num_ctas, T::kThreads,\n"
                  f"                          T::kSmemBytes, stream, params, /*max_shared_carveout=*/{carveout},\n"
                  f"                          attributes_set);\n"
                  f"}}\n")
    text = INSTANTIATION.format(me=ME, includes="".join(f'#include "{h}"\n' for h in ks.kernel_headers),
                                tier=ks.tier, instantiations=lines)
    path = (f"csrc/cuda/{ks.tier}/instantiations/"
            f"{ks.pass_name}_hdim{hdim}_{dtype.name}{variant.suffix}_{ks.tier}.cu")
    return path, text


def registry_row(ks: KernelSet, hdim: int, dtype: Dtype, variant: Variant) -> str:
    """One table entry of the registry: the kernel(s) of one (head dim, dtype, variant)."""
    fields = {"dtype": dtype.abi, "mask": f"MaskMode::{variant.mode}", "softcap": str(variant.softcap).lower(),
              "element": dtype.element}
    for i, launch in enumerate(ks.launches):
        traits = f"{ks.tier}::" + launch.traits.format(element=dtype.element, hdim=hdim)
        fields[f"traits{i}"] = traits
        fields[f"launch{i}"] = f"{ks.tier}::{launch.function(hdim, dtype, variant)}"
    args = ",\n        ".join(arg.format(**fields) for arg in ks.entry_args)
    return f"{ks.entry_maker.format(**fields)}(\n        {args})"


def launch_declarations(ks: KernelSet) -> str:
    """The declarations of a kernel set's launch functions (defined in its instantiation files)."""
    text = f"namespace {ks.tier} {{\n"
    for hdim in ks.head_dims:
        text += f"#ifdef RINGATTN_HDIM_{hdim}\n"
        for dtype in DTYPES:
            for variant in ks.variants:
                for launch in ks.launches:
                    text += f"{launch.declaration(hdim, dtype, variant)};\n"
        text += "#endif\n"
    return text + f"}}  // namespace {ks.tier}\n"


def registry_table(ks: KernelSet) -> str:
    """A kernel set's launch declarations, table and lookup function."""
    table, entry_type, lookup = ks.registry_names()
    text = f"\n// {ks.title}\n{launch_declarations(ks)}const {entry_type} {table}[] = {{\n"
    for hdim in ks.head_dims:
        text += f"#ifdef RINGATTN_HDIM_{hdim}\n"
        for dtype in DTYPES:
            for variant in ks.variants:
                text += f"    {registry_row(ks, hdim, dtype, variant)},\n"
        text += "#endif\n"
    text += f"    {entry_type}{{}}}};\n"  # the sentinel: dtype -1
    text += (f"\nconst {entry_type}* {lookup}(int dtype, int head_dim, KernelVariant variant) {{\n"
             f"  return find_entry({table}, dtype, head_dim, variant);\n}}\n")
    return text


def registry() -> str:
    """The text of csrc/cuda/kernel_registry.cu."""
    headers = [(TIER_GUARD.get(ks.tier), h) for ks in KERNELS for h in ks.declarations]
    includes = ""
    for guard in dict.fromkeys(g for g, _ in headers):
        names = sorted(dict.fromkeys(h for g, h in headers if g == guard))
        body = "".join(f'#include "{h}"\n' for h in names)
        includes += f"#ifdef {guard}\n{body}#endif\n" if guard else body
    text = REGISTRY_HEADER.format(me=ME, includes=includes)
    for guard in dict.fromkeys(TIER_GUARD.get(ks.tier) for ks in KERNELS):
        tables = "".join(registry_table(ks) for ks in KERNELS if TIER_GUARD.get(ks.tier) == guard)
        text += f"\n#ifdef {guard}{tables}#endif  // {guard}\n" if guard else tables
    return text + REGISTRY_FOOTER


def generate() -> dict[str, str]:
    """Every generated file's text, keyed by its path in the repository."""
    files = {}
    for ks in KERNELS:
        for hdim in ks.head_dims:
            for dtype in DTYPES:
                for variant in ks.variants:
                    path, text = instantiation_file(ks, hdim, dtype, variant)
                    files[path] = text
    files[REGISTRY] = registry()
    return files


if __name__ == "__main__":
    sys.exit(gen_common.main("gen_instantiations.py", generate,
                             owned=("csrc/cuda/sm80/instantiations/*.cu", "csrc/cuda/sm90/instantiations/*.cu")))
