"""Context parallelism: attention over a sequence split across the ranks of a process group.

Shared pieces, each in one module:

* ``process_group``: resolving a group to (group, world size, rank);
* ``validation``: the argument checks of every scheme;
* ``index_maps``: device-side row maps (sequence of a row, inverse permutation);
* ``ring_comm``: ring point-to-point exchange of K/V (and dK/dV) blocks;
* ``lse_merge``: merging partial outputs through their log-sum-exp (fp32 / fp64);
* ``all_gather``: the sliced K/V all-gather and the autograd function of the all-gather schemes;
* ``reduce_scatter``: the reduce-scatter of their dK/dV slices;
* ``ring_engine``: the ring attention forward / backward shared by the ring schemes;
* ``zigzag_layout``, ``llama3_layout``: the sharding and metadata helpers of the layouts;
* ``all_to_all``: the all-to-all between sequence and head shards and its autograd function;
* ``features``: the attention features (softcap, sinks) handed on to the attention a scheme runs;
* ``mesh``: the 2-D mesh of the hybrid scheme and the helper choosing its degrees.

Schemes, one module each: ``ring``, ``zigzag_ring``, ``stripe`` (ring attention),
``llama3``, ``zigzag_llama3`` (all-gather of K/V), ``ulysses`` (all-to-all over heads),
``hybrid`` (all-to-all inside a mesh's groups, an all-gather scheme across them). ``scheme`` describes a scheme and
``registry`` lists them (``get_scheme(name)``, ``schemes()``); the HuggingFace adapter
(``ring_flash_attn.hf_adapter``) offers the registered schemes that have an ``hf`` binding.
The public functions are re-exported by the top-level ``ring_flash_attn`` package.
"""

from .registry import get_scheme, hf_schemes, register_scheme, schemes
from .scheme import BatchNotSupported, ContextParallelScheme, HFBinding

__all__ = ["BatchNotSupported", "ContextParallelScheme", "HFBinding", "get_scheme", "hf_schemes",
           "register_scheme", "schemes"]
