"""The inner compilers a graph is handed to, with the Inductor options of rewritten graphs."""

from __future__ import annotations

from typing import Callable

import torch.fx as fx

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


def inner_compile(gm: fx.GraphModule, example_inputs, inner: str, rewritten: bool = False) -> Callable:
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        # The decomposing variant: plain aot_eager replays traced `view`s in
        # backward that can be invalid for the real strides of vmapped ops.
        from torch._dynamo.backends.debugging import aot_eager_decomp_partition

        return aot_eager_decomp_partition(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=REWRITTEN_INDUCTOR_CONFIG if rewritten else None)
