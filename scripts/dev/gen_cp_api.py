#!/usr/bin/env python3
"""Writes the explicit public entry points of the context-parallel package (``ring_flash_attn.cp``):
functions that users find with ``grep "def name"`` and whose signatures type checkers and help()
read, but whose bodies are one call each.

* ``cp/ring.py``, ``cp/zigzag_ring.py``, ``cp/stripe.py``: each ring scheme's batched form
  ``<prefix>_func`` and (ring, zigzag ring) varlen form ``<prefix>_varlen_func``, each with its
  K/V-packed and Q/K/V-packed forms, over ``ring_engine`` and the scheme's ``RingLayout``
  (``cp/ring_patterns.py``). Their signature is ``RING_ARGS`` below.
* ``cp/packed.py``: the K/V-packed and Q/K/V-packed forms of the other schemes' functions
  (``PACKED`` below). Their signatures are read from the scheme's own function (its source, with
  ``ast``), with ``q, k, v`` replaced by ``q, kv`` or ``qkv``: a parameter added to a scheme
  function reaches its packed forms by rerunning this script.

Run after changing a table below or the signature of a function in ``PACKED``; --check tells
whether the committed files are up to date (gen_common.py).
"""
from __future__ import annotations

import ast
import re
import sys
import textwrap
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import gen_common

ME = "scripts/dev/gen_cp_api.py"
CP = "python/ring_flash_attn/cp"
WIDTH = 120  # the package's line length
RETURNS = "Union[Tensor, Tuple[Tensor, Tensor, None]]"

# The ring functions' parameters after q, k, v (batched) or after q, k, v, cu_seqlens, max_seqlen
# (varlen): (name, annotation, default). ring_engine takes the ones before softcap positionally.
RING_ARGS = (
    ("dropout_p", "float", "0.0"), ("softmax_scale", "Optional[float]", "None"), ("causal", "bool", "False"),
    ("window_size", "Tuple[int, int]", "(-1, -1)"), ("alibi_slopes", "Optional[Tensor]", "None"),
    ("deterministic", "bool", "False"), ("return_attn_probs", "bool", "False"),
    ("group", "Optional[ProcessGroup]", "None"), ("seqlens", "SeqlensArg", "None"), ("softcap", "float", "0.0"),
    ("sinks", "Optional[Tensor]", "None"),
)
RING_KEYWORD_ARGS = ("softcap", "sinks")
VARLEN_ARGS = (("cu_seqlens", "Tensor", None), ("max_seqlen", "int", None))


@dataclass(frozen=True)
class RingScheme:
    """One ring scheme's module. Docstring texts are written as they read (wrapped, no indent)."""
    module: str
    prefix: str  # of the function names
    layout: str  # its RingLayout in ring_patterns.py
    title: str  # first line of the module docstring
    layout_doc: str  # the module docstring's "Layout:" paragraph
    batched_title: str
    batched_shapes: str
    varlen_title: Optional[str] = None  # None: no varlen forms
    varlen_shapes: Optional[str] = None


RING_SCHEMES = (
    RingScheme(
        module="ring", prefix="ring_flash_attn", layout="RING_LAYOUT",
        title="Ring attention over the contiguous layout (upstream ring-flash-attention's ``ring_*`` functions).",
        layout_doc="""\
            Layout: of every sequence each of the N ranks holds the same number of tokens, L; rank r holds
            tokens ``[r L, (r + 1) L)`` (the sequence cut into N contiguous pieces, piece r on rank r).""",
        batched_title="Ring attention over the contiguous layout (upstream's ``ring_flash_attn_func``).",
        batched_shapes="""\
            q ``[B, L, Hq, D]``, k and v ``[B, L, Hk, D]``: rank r's tokens ``[r L, (r+1) L)`` of each
            of the B sequences.""",
        varlen_title=("Ring attention over packed sequences, contiguous layout (upstream's "
                      "``ring_flash_attn_varlen_func``)."),
        varlen_shapes="""\
            q ``[T, Hq, D]``, k and v ``[T, Hk, D]``: of every sequence, split into N pieces, rank r
            holds piece r."""),
    RingScheme(
        module="zigzag_ring", prefix="zigzag_ring_flash_attn", layout="ZIGZAG_LAYOUT",
        title="Ring attention over the zigzag layout (upstream ring-flash-attention's ``zigzag_ring_*`` functions).",
        layout_doc="""\
            Layout: of every sequence each of the N ranks holds the same number of tokens, L (even): the
            sequence is cut into 2N chunks of c = L / 2 tokens and rank r holds chunk r then chunk 2N-1-r
            (``zigzag_layout.zigzag_shard``'s layout). Causal work is balanced across ranks.""",
        batched_title="Ring attention over the zigzag layout (upstream's ``zigzag_ring_flash_attn_func``).",
        batched_shapes="""\
            q ``[B, L, Hq, D]``, k and v ``[B, L, Hk, D]``, L even: of the 2N chunks of L/2 tokens of
            each of the B sequences, rank r holds chunk r then chunk 2N-1-r.""",
        varlen_title=("Ring attention over packed sequences, zigzag layout (upstream's "
                      "``zigzag_ring_flash_attn_varlen_func``)."),
        varlen_shapes="""\
            q ``[T, Hq, D]``, k and v ``[T, Hk, D]``: of every sequence, split into 2N chunks, rank r
            holds chunk r then chunk 2N-1-r, as ``zigzag_shard`` lays them out (local lengths even)."""),
    RingScheme(
        module="stripe", prefix="stripe_flash_attn", layout="STRIPE_LAYOUT",
        title="Ring attention over the stripe layout (upstream ring-flash-attention's ``stripe_*`` functions).",
        layout_doc="""\
            Layout (batched forms only): of every sequence each of the N ranks holds the same number of
            tokens, L; rank r holds tokens ``r, r + N, r + 2N, ...`` (local token i is global token i N + r).""",
        batched_title="Ring attention over the stripe layout (upstream's ``stripe_flash_attn_func``).",
        batched_shapes="""\
            q ``[B, L, Hq, D]``, k and v ``[B, L, Hk, D]``: local token i of each of the B sequences is
            its global token i N + r."""),
)


@dataclass(frozen=True)
class Form:
    """A packed form: the suffix its name adds, the tensors it takes instead of q, k, v, and the
    line that unpacks them (``{kind}``: batched or varlen, the layout of validation.unpack_*)."""
    suffix: str
    inputs: Tuple[str, ...]
    unpack: str


PLAIN = Form("", ("q", "k", "v"), "")
KV = Form("_kvpacked", ("q", "kv"), "k, v = unpack_{kind}_kv(kv)")
QKV = Form("_qkvpacked", ("qkv",), "q, k, v = unpack_{kind}_qkv(qkv)")
# The packed tensors' shapes, for the docstrings.
PACKED_SHAPES = {("batched", KV): ("q ``[B, L, Hq, D]``", "kv ``[B, L, 2, Hk, D]``"),
                 ("batched", QKV): ("qkv ``[B, L, 3, H, D]``",),
                 ("varlen", KV): ("q ``[T, Hq, D]``", "kv ``[T, 2, Hk, D]``"),
                 ("varlen", QKV): ("qkv ``[T, 3, H, D]``",)}
PACKED_WHAT = {KV: "with K and V packed", QKV: "with Q, K and V packed (MHA)"}


@dataclass(frozen=True)
class PackedFunction:
    """A scheme function whose packed forms go to packed.py. impl_flags: its keyword parameters
    that the packed forms collect in ``**impl_flags`` instead of naming them."""
    module: str
    name: str
    kind: str  # "batched" or "varlen"
    impl_flags: Tuple[str, ...] = ()


PACKED = (
    PackedFunction("llama3", "llama3_flash_attn_varlen_func", "varlen"),
    PackedFunction("zigzag_llama3", "zigzag_llama3_flash_attn_varlen_func", "varlen",
                   impl_flags=("use_grouped_attention", "use_triton_grouped", "use_fused_kernel", "grad_reduce_dtype")),
    PackedFunction("ulysses", "ulysses_flash_attn_varlen_func", "varlen"),
    PackedFunction("ulysses", "ulysses_flash_attn_func", "batched"),
    PackedFunction("hybrid", "hybrid_flash_attn_varlen_func", "varlen"),
)

# Where the names used in the signatures' annotations come from.
IMPORTS = {
    "Any": "from typing import Any", "Optional": "from typing import Optional", "Tuple": "from typing import Tuple",
    "Union": "from typing import Union", "torch": "import torch", "Tensor": "from torch import Tensor",
    "SeqlensArg": "from .padding import SeqlensArg", "HybridMesh": "from .mesh import HybridMesh",
}
BUILTINS = {"bool", "float", "int", "slice", "str", "None"}
TYPE_CHECKING_IMPORTS = {"ProcessGroup": "from torch.distributed import ProcessGroup"}


# ---- text helpers -------------------------------------------------------------------------------


def wrap(tokens: Sequence[str], first: str, indent: str, width: int = WIDTH) -> List[str]:
    """The tokens joined by spaces after ``first``, greedily wrapped at ``width`` columns; lines
    after the first start with ``indent``."""
    lines, line, empty = [], first, True
    for token in tokens:
        if not empty and len(line) + 1 + len(token) > width:
            lines.append(line)
            line, empty = indent, True
        line += token if empty else " " + token
        empty = False
    lines.append(line)
    return lines


def wrap_list(items: Sequence[str], first: str, indent: str, last: str) -> List[str]:
    """``first`` + the items separated by commas + ``last``, wrapped at WIDTH."""
    return wrap([item + ("," if i + 1 < len(items) else last) for i, item in enumerate(items)], first, indent)


def docstring(text: str) -> List[str]:
    """A function's docstring literal: ``text`` on one line if it fits, else its words wrapped at
    100 columns (spans in double backticks kept whole). A text of several paragraphs is kept as
    written, with the closing quotes on a line of their own."""
    if "\n" in text:
        return ['    """' + text.split("\n")[0]] + [("    " + line).rstrip() for line in text.split("\n")[1:]] + [
            '    """']
    if len(text) + 10 <= WIDTH:
        return [f'    """{text}"""']
    tokens = re.findall(r"(?:``.*?``|[^\s`])+", text)
    tokens[-1] += '"""'
    return wrap(tokens, '    """', "    ", width=100)


def param(name: str, annotation: Optional[str], default: Optional[str]) -> str:
    text = name if annotation is None else f"{name}: {annotation}"
    return text if default is None else f"{text} = {default}"


def function(name: str, params: Sequence[str], returns: str, body: Sequence[str], decorator: str = "") -> List[str]:
    """A ``def`` whose parameter list is wrapped at WIDTH (a comma after the last parameter)."""
    lines = ["", ""] + ([decorator] if decorator else []) + [f"def {name}("]
    lines += wrap_list(list(params), "    ", "    ", ",")
    return lines + [f") -> {returns}:"] + list(body)


def dedent(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


def imports_of(names: Sequence[str], module: str) -> List[str]:
    """``from <module> import (names)`` wrapped at WIDTH."""
    head = f"from {module} import "
    if len(head) + len(", ".join(names)) <= WIDTH:
        return [head + ", ".join(names)]
    return wrap_list(list(names), head + "(", " " * (len(head) + 1), ")")


# ---- the ring schemes ---------------------------------------------------------------------------


def form_name(prefix: str, kind: str, form: Form) -> str:
    return f"{prefix}{'_varlen' if kind == 'varlen' else ''}{form.suffix}_func"


def ring_function(scheme: RingScheme, kind: str, form: Form) -> List[str]:
    varlen = kind == "varlen"
    main = form_name(scheme.prefix, kind, PLAIN)
    params = [param(t, "Tensor", None) for t in form.inputs]
    params += [param(*a) for a in (VARLEN_ARGS if varlen else ()) + RING_ARGS]
    if form is PLAIN:
        title = scheme.varlen_title if varlen else scheme.batched_title
        shapes = scheme.varlen_shapes if varlen else scheme.batched_shapes
        body = docstring(f"{title}\n\n{dedent(shapes)}")
    else:
        body = docstring(f"``{main}`` {PACKED_WHAT[form]}: {', '.join(PACKED_SHAPES[kind, form])}.")
        body.append("    " + form.unpack.format(kind=kind))
    args = [scheme.layout, "q", "k", "v"] + [a[0] for a in VARLEN_ARGS if varlen]
    args += [f"{a[0]}={a[0]}" if a[0] in RING_KEYWORD_ARGS else a[0] for a in RING_ARGS]
    first = f"    return ring_attention{'_varlen' if varlen else ''}("
    body += wrap_list(args, first, " " * len(first), ")")
    return function(form_name(scheme.prefix, kind, form), params, RETURNS, body, f"@with_{kind}_args_doc")


def ring_module(scheme: RingScheme) -> str:
    kinds = ("batched", "varlen") if scheme.varlen_title else ("batched",)
    names = [form_name(scheme.prefix, kind, form) for kind in kinds for form in (PLAIN, KV, QKV)]
    engine = ["ring_attention"] + (["ring_attention_varlen"] if "varlen" in kinds else [])
    engine += [f"with_{kind}_args_doc" for kind in kinds]
    unpack = sorted(f"unpack_{kind}_{packed}" for kind in kinds for packed in ("kv", "qkv"))
    lines = [f"# Generated by {ME}: do not edit.", f'"""{scheme.title}', "", dedent(scheme.layout_doc), "",
             f"The causal sub-blocks of each ring step are ``ring_patterns.{scheme.layout}``'s; the ring itself",
             "is ``ring_engine``'s: every function here is one call into it.", '"""', "",
             "from __future__ import annotations", "", "from typing import TYPE_CHECKING, Optional, Tuple, Union", "",
             "from torch import Tensor", "", "from .padding import SeqlensArg", *imports_of(engine, ".ring_engine"),
             f"from .ring_patterns import {scheme.layout}", *imports_of(unpack, ".validation"), "",
             "if TYPE_CHECKING:",
             "    from torch.distributed import ProcessGroup", "",
             *wrap_list([f'"{n}"' for n in [scheme.layout] + names], "__all__ = [", "           ", "]")]
    for kind in kinds:
        for form in (PLAIN, KV, QKV):
            lines += ring_function(scheme, kind, form)
    return "\n".join(lines) + "\n"


# ---- the packed forms of the other schemes --------------------------------------------------------


def function_def(module: str, name: str) -> ast.FunctionDef:
    """The ``def name`` of python/ring_flash_attn/cp/<module>.py."""
    path = gen_common.ROOT / CP / f"{module}.py"
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise SystemExit(f"{ME}: no function {name} in {CP}/{module}.py")


def annotation_names(node: ast.FunctionDef) -> set:
    """The names the annotations of ``node`` use (what the packed module must import)."""
    annotations = [a.annotation for a in node.args.args if a.annotation is not None] + [node.returns]
    return {n.id for a in annotations for n in ast.walk(a) if isinstance(n, ast.Name)}


def packed_doc(fn: PackedFunction, form: Form) -> str:
    shapes = PACKED_SHAPES[fn.kind, form]
    if fn.kind == "varlen":  # these docstrings quote the packed tensor's name
        shapes = tuple("``{}`` {}".format(*s.split(" ", 1)) if s.startswith(("kv ", "qkv ")) else s for s in shapes)
    doc = f"``{fn.name}`` {PACKED_WHAT[form]}: {', '.join(shapes)}"
    if fn.impl_flags:
        flags = ", ".join(f"``{f}``" for f in fn.impl_flags)
        doc += f"; impl_flags: its keyword arguments {flags}" if form is KV else "; impl_flags as there"
    if fn.kind == "varlen":
        doc += f". Returns ``out`` ``[T, {'Hq' if form is KV else 'H'}, D]`` or ``(out, lse, None)``"
    return doc + "."


def packed_function(fn: PackedFunction, form: Form) -> Tuple[List[str], set]:
    """The packed form of ``fn`` and the names its annotations use."""
    node = function_def(fn.module, fn.name)
    a = node.args
    if a.vararg or a.kwonlyargs or a.kwarg or a.posonlyargs or [x.arg for x in a.args[:3]] != ["q", "k", "v"]:
        raise SystemExit(f"{ME}: {fn.name} must take (q, k, v, ...) as plain parameters")
    defaults = [None] * (len(a.args) - len(a.defaults)) + [ast.unparse(d) for d in a.defaults]
    rest = [(x.arg, ast.unparse(x.annotation), d) for x, d in zip(a.args[3:], defaults[3:])]
    missing = sorted(set(fn.impl_flags) - {r[0] for r in rest})
    if missing:
        raise SystemExit(f"{ME}: {fn.name} has no parameters {missing}")
    params = [param(t, "Tensor", None) for t in form.inputs] + [param(*r) for r in rest if r[0] not in fn.impl_flags]
    params += ["**impl_flags: Any"] if fn.impl_flags else []
    # Positional up to the first parameter collected in impl_flags, by keyword after it.
    args, by_keyword = ["q", "k", "v"], False
    for name, _, _ in rest:
        by_keyword = by_keyword or name in fn.impl_flags
        if name not in fn.impl_flags:
            args.append(f"{name}={name}" if by_keyword else name)
    args += ["**impl_flags"] if fn.impl_flags else []
    body = docstring(packed_doc(fn, form))
    body.append("    " + form.unpack.format(kind=fn.kind))
    body += [f"    return {fn.name}("] + wrap_list(args, "        ", "        ", ")")
    names = annotation_names(node) | ({"Any"} if fn.impl_flags else set())
    return function(form_name(fn.name[:-len("_func")], "", form), params, ast.unparse(node.returns), body), names


def packed_module() -> str:
    functions, names = [], set()
    for fn in PACKED:
        for form in (KV, QKV):
            lines, used = packed_function(fn, form)
            functions += lines
            names |= used
    names -= BUILTINS
    unknown = sorted(names - set(IMPORTS) - set(TYPE_CHECKING_IMPORTS))
    if unknown:
        raise SystemExit(f"{ME}: add the import of {unknown} to IMPORTS")
    typing_names = sorted(n for n in names if IMPORTS.get(n, "").startswith("from typing "))
    plain = sorted({IMPORTS[n] for n in names if n in IMPORTS and not IMPORTS[n].startswith(("from typing ", "from ."))},
                   key=lambda line: (line.split()[1], line.startswith("from ")))
    # The package's own imports, one per module, in module order.
    local = {IMPORTS[n].split()[1]: [IMPORTS[n].split()[3]] for n in names if IMPORTS.get(n, "").startswith("from .")}
    for fn in PACKED:
        local.setdefault(f".{fn.module}", []).append(fn.name)
    local[".validation"] = sorted({f"unpack_{fn.kind}_{packed}" for fn in PACKED for packed in ("kv", "qkv")})
    local = [line for module in sorted(local) for line in imports_of(sorted(local[module]), module)]
    exported = [form_name(fn.name[:-len("_func")], "", form) for fn in PACKED for form in (KV, QKV)]
    lines = [f"# Generated by {ME}: do not edit.",
             '"""The packed forms of the all-gather and all-to-all schemes\' functions: K and V packed in one',
             "tensor (``*_kvpacked_func``), or Q, K and V (``*_qkvpacked_func``, MHA). Each unpacks its input",
             "(views, no copy) and calls the scheme's function with the same arguments; see that function",
             'for what they mean."""', "", "from __future__ import annotations", "",
             "from typing import TYPE_CHECKING, " + ", ".join(typing_names), "", *plain, "", *local, "",
             "if TYPE_CHECKING:", *["    " + TYPE_CHECKING_IMPORTS[n] for n in sorted(names & set(TYPE_CHECKING_IMPORTS))],
             "", *wrap_list([f'"{n}"' for n in exported], "__all__ = [", "           ", "]")]
    return "\n".join(lines + functions) + "\n"


def generate() -> Dict[str, str]:
    files = {f"{CP}/{scheme.module}.py": ring_module(scheme) for scheme in RING_SCHEMES}
    files[f"{CP}/packed.py"] = packed_module()
    return files


if __name__ == "__main__":
    sys.exit(gen_common.main("gen_cp_api.py", generate))
