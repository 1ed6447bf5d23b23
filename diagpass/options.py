"""The backend's options (``torch.compile(..., options={...})``)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from diagpass.runtime.inner import INNER_COMPILERS


@dataclasses.dataclass(frozen=True)
class Options:
    """Backend options (``torch.compile(..., options={...})``).

    inner:     compiler for the rewritten graph: "inductor" | "aot_eager" | "eager".
    min_group: smallest group of identical cells worth one batched call.
    verify:    on the first call also run the original graph and raise
               ``DiagonalMismatch`` if outputs differ (rtol/atol below).
    enabled:   False compiles the graph unchanged (same inner compiler): the
               sequential baseline.
    cost_model: on CPU with Inductor, do not batch when the layer weights would
               be copied per call and the copy outweighs what batching can save
               (``passes/cost.py``); False batches whenever it is safe.
    max_memory_ratio: with Inductor, do not batch when stacking (copying) the
               layer weights per call would raise the peak memory above this
               multiple of the sequential graph's (both estimated from the
               example values, ``passes/cost.py``); a call whose weights are
               stored stacked still batches. Part of ``cost_model``.
    measure_band: a cost estimate within this factor of the cost rule's
               threshold is too close for a rule from one machine: the graph
               is compiled both batched and sequential, inference calls take
               turns on them, and after three timed calls each the faster one
               runs from then on (``runtime/dispatch.MeasuredChoice``; the
               outcome is in the report's ``measured``). On CPU a call whose
               weights are stored stacked copies nothing for the rule to weigh:
               its batched graph is always timed against the sequential one
               the same way (``measured_stacked``). 1 turns measuring off.
    shared_subgraphs: with Inductor (and not ``roll``), in inference, every
               cell runs as a call (batched groups and single cells alike) and
               each distinct call is one subgraph Inductor compiles once, the
               glue around them compiled in the same graph
               (``runtime/subgraphs.py``): compile cost follows the distinct
               calls, not the segments. False inlines every call (the unrolled
               graph); graphs that need gradients always inline.
    shared_sequential: with ``segment_steps=False``, the sequential graph the cost and
               memory rules fall back to runs cell by cell with shared subgraphs too (inference,
               Inductor): its compile cost then follows the distinct cells, not
               S x L, but it ran 4-6% slower than Inductor's inline sequential
               graph on some configs and 14% faster on others (README). Off by
               default (never slower than ``torch.compile(model)``): Dynamo's
               graph compiles inline.
    segment_steps: the sequential graph (where the cost or memory rule refuses to
               batch, or nothing can batch) runs as one call per segment, each
               distinct segment compiled once and cached process-wide
               (``passes/segment_steps.py``): compile cost follows the distinct
               segments (about three), not S, and a new segment count compiles
               nothing new. Training too (each step has its backward). False
               compiles Dynamo's graph whole (``shared_sequential`` decides how).
    wavefront_steps: the batched graph (not ``roll``) runs as one call per wavefront,
               each distinct wavefront compiled once and cached process-wide
               (``passes/wavefront_steps.py``): the steady state is one structure,
               so compile cost follows L, not S, and a new segment count compiles
               only the wavefronts it has not met. Training too (each step has its
               backward). False compiles the batched graph whole
               (``shared_subgraphs`` decides how): its steady state measured a few
               percent faster than the steps' on CPU (README), at a compile cost
               that grows with S.
    symbolic_width: wavefront steps read their groups' inputs stacked and return their
               results stacked (the stacking runs between the steps,
               ``passes/width_free.py``), and a step is compiled once for a symbolic
               group width G: the ramp wavefronts of every width share one kernel, and
               a segment count below L, or a new one, compiles no step for a width it
               has not met. False compiles each width's step for its own G.
    glue_steps: a wavefront's glue runs in steps of its own: what enters (the
               segment's embedding, its cat with the memory tokens) before its
               wavefront's step, what leaves (the final norm, the logits) after it,
               each such step one structure for every segment. A wavefront's step is
               then its cells only, so the wavefronts of a segment count, whether or
               not segments enter or leave at them, share their steps with every
               other count's. False keeps the glue in the wavefront's step (one
               structure per kind of wavefront: ramp, steady, segment 0 leaving).
    step_cpp_wrapper: with Inductor, segment and wavefront steps whose tensors are
               on the CPU are compiled with Inductor's C++ wrapper (``cpp_wrapper``):
               the code around a step's kernels (buffer allocation, the size and
               stride checks of every input) runs compiled instead of as Python,
               which on short steps was what kept the steps behind the whole graph
               (README). It adds a C++ compile per distinct step; a step it fails
               on uses the Python wrapper. Other devices use the Python wrapper
               (not measured there).
    roll:      compile each distinct batched step once (cached across graphs
               and segment counts) and run the schedule as a host loop, glue
               eager; compile cost independent of the number of segments.
    compile_glue: with ``roll``, in inference, compile the glue too, around
               the group calls as opaque ops (``runtime/group_op.py``), instead
               of running it eagerly. On CPU it measured no faster than eager
               glue (README); it is meant for devices where every eager op is
               a kernel launch.
    cache_weight_stacks: keep the layer weights' stacks between calls instead
               of stacking (copying) them on every call, rebuilt when any of
               those parameters changes (version counter, storage). Costs one
               more copy of the layer weights in memory, which is why it is
               off unless asked for; ``diagpass.stack_weights_`` gets the same
               without the copy. Inference only: a call that needs gradients
               for the weights stacks them as before.
    max_size_specializations: a graph Dynamo kept dynamic (the input length a
               symbol: the second segment count) is compiled as the static graph
               of each call's sizes (``passes/specialize.py``), so that its cells
               group as the static graph's do and stored weight stacks are read,
               up to this many distinct sizes per graph; calls with more sizes run
               one graph for all sizes (Dynamo's graph traced again with
               ``dynamic=True``), with a warning. 0 compiles the dynamic graph
               once for all sizes, as it is.
    """

    inner: str = "inductor"
    min_group: int = 2
    verify: bool = False
    rtol: float = 1e-5
    atol: float = 1e-5
    enabled: bool = True
    roll: bool = False
    shared_subgraphs: bool = True
    shared_sequential: bool = False
    segment_steps: bool = True
    wavefront_steps: bool = True
    symbolic_width: bool = True
    glue_steps: bool = True
    step_cpp_wrapper: bool = True
    cost_model: bool = True
    max_memory_ratio: float = 1.1
    measure_band: float = 4.0
    compile_glue: bool = False
    cache_weight_stacks: bool = False
    max_size_specializations: int = 8

    @property
    def compiles_shared_subgraphs(self) -> bool:
        return self.shared_subgraphs and self.inner == "inductor" and not self.roll

    @property
    def every_cell_a_call(self) -> bool:
        """The batch pass emits single cells as calls too (``roll``, shared subgraphs)."""
        return self.roll or self.compiles_shared_subgraphs

    @classmethod
    def from_dict(cls, options: Optional[dict]) -> "Options":
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"diagpass: unknown option(s) {unknown}; known options are {sorted(known)}"
            )
        opts = cls(**options)
        if opts.inner not in INNER_COMPILERS:
            raise ValueError(f"diagpass: options['inner'] must be one of {INNER_COMPILERS}, got {opts.inner!r}")
        if not isinstance(opts.min_group, int) or opts.min_group < 2:
            raise ValueError(f"diagpass: options['min_group'] must be an int >= 2, got {opts.min_group!r}")
        if not isinstance(opts.max_memory_ratio, (int, float)) or opts.max_memory_ratio < 1:
            raise ValueError(f"diagpass: options['max_memory_ratio'] must be a number >= 1, got {opts.max_memory_ratio!r}")
        if not isinstance(opts.measure_band, (int, float)) or opts.measure_band < 1:
            raise ValueError(f"diagpass: options['measure_band'] must be a number >= 1, got {opts.measure_band!r}")
        if not isinstance(opts.max_size_specializations, int) or opts.max_size_specializations < 0:
            raise ValueError("diagpass: options['max_size_specializations'] must be an int >= 0, got "
                             f"{opts.max_size_specializations!r}")
        return opts
