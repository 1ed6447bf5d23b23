"""The inner compilers a graph is handed to, with the Inductor options of rewritten graphs."""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

INNER_COMPILERS = ("inductor", "aot_eager", "eager")

# Inductor options for a rewritten graph (measured in benchmarks/, see README):
# - reorder_for_locality moves each producer right before its consumer. It moved
#   every segment's final norm and logits to the closing concatenation; each reads
#   a slice of a batched group's output, so every group buffer stayed alive to the
#   end (peak memory several times higher, latency unchanged).
# - realize_reads_threshold 2 (stock 4): a pointwise result read by two or three
#   kernels is stored instead of recomputed; the batched residual sum was otherwise
#   recomputed in the last FFN kernel from inputs kept alive only for it.
REWRITTEN_INDUCTOR_CONFIG = {"reorder_for_locality": False, "realize_reads_threshold": 2}
# A step (runtime/segment_steps.py) is a short graph called S times a call: its Python
# wrapper (allocating each buffer, asserting each input's size and stride) runs every
# step, where the whole graph runs one wrapper a call and reuses buffers across segments.
# Inductor's C++ wrapper does the same work, input checks included, as compiled code (README).
CPP_WRAPPER_CONFIG = {"cpp_wrapper": True}


def inner_compile(gm: fx.GraphModule, example_inputs, inner: str, rewritten: bool = False,
                  cpp_wrapper: bool = False, own_symbols: bool = False) -> Callable:
    """``own_symbols``: the example inputs are fakes of a ShapeEnv of ours (symbolic
    widths, ``runtime/kernel_cache.py``), and the kernel is kept for the widths that
    ShapeEnv's guards admit. So:

    - their symbols have no source in any graph's inputs: Inductor's FX graph cache
      and AOTAutograd's cache, which store guards written over those sources, cannot
      check a stored entry (they raise NameError), and are off;
    - the backward is lowered now, not on first use: its guards then exist before
      any other width is admitted;
    - ``backed_size_oblivious``: a ``guard_or_false`` / ``guard_or_true`` takes its
      default (the branch valid for every size) instead of guarding on the hint.
      Metadata checks such as "is this leading dim 1" (``is_contiguous`` in
      ``_extract_tensor_metadata``) otherwise tie the kernel compiled at G = 2 to
      G - 1 = 1 rows, and the one compiled at G = 3 to G != 2."""
    if own_symbols:
        import torch._functorch.config as functorch_config
        import torch.fx.experimental._config as shapes_config

        with functorch_config.patch(enable_autograd_cache=False, force_non_lazy_backward_lowering=True), \
                shapes_config.patch(backed_size_oblivious=True):
            return _inner_compile(gm, example_inputs, inner, rewritten, cpp_wrapper, {"fx_graph_cache": False})
    return _inner_compile(gm, example_inputs, inner, rewritten, cpp_wrapper, {})


def _inner_compile(gm, example_inputs, inner: str, rewritten: bool, cpp_wrapper: bool, extra: dict) -> Callable:
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        # The decomposing variant: plain aot_eager replays traced `view`s in
        # backward that can be invalid for the real strides of vmapped ops.
        from torch._dynamo.backends.debugging import aot_eager_decomp_partition

        return aot_eager_decomp_partition(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    if cpp_wrapper:
        _placeholders_read_as(gm, example_inputs)
    patches = {**(REWRITTEN_INDUCTOR_CONFIG if rewritten else {}), **(CPP_WRAPPER_CONFIG if cpp_wrapper else {}), **extra}
    return compile_fx(gm, example_inputs, config_patches=patches or None)


def _placeholders_read_as(gm: fx.GraphModule, example_inputs) -> None:
    """With the C++ wrapper, ``compile_fx`` takes a GraphModule's inputs from its
    placeholders' ``meta["val"]``, not from ``example_inputs``
    (``_extract_inputs_from_exported_gm``); a step's placeholders may carry none, or
    Dynamo's symbolic ones. Each becomes a fake of its real input, in one mode, so the
    kernel is compiled for exactly the inputs the Python wrapper would be."""
    mode = FakeTensorMode()
    for ph, x in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
        if isinstance(x, FakeTensor):  # already a fake (a symbolic width's, runtime/kernel_cache.py)
            ph.meta["val"] = x
        else:
            ph.meta["val"] = mode.from_tensor(x) if isinstance(x, torch.Tensor) else x
