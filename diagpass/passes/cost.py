"""cost: does batching pay when the layer weights must be copied?

Not a rewrite: an estimate the backend decides with. A batched graph whose
layer weights are ordinary parameters stacks every layer's weights once per
call (``torch.stack``: a fresh copy of all L layers' weights). On a GPU that
copy is small next to what batching saves (fewer, fuller kernels); on a CPU,
where Inductor's sequential code already keeps the cores busy, batching saves
little and the copy is the difference. On CPU the pipeline does not batch
when the ratio is above ``CPU_COPY_BYTES_PER_FLOP`` and the weights would be
copied (a rule of thumb from one machine's measurements, in the README and
``benchmarks/results/``; not a calibration); weights stored stacked
(``diagpass.stack_weights_``) are never copied: whether their batched graph
pays is timed at run time instead (``pipeline._measures_stacks``).

The copy also costs memory: the stacks live for the whole call, so a
copying batched call peaks at about the sequential peak plus the layer
weights. ``sequential_peak_bytes`` estimates that peak from the example
values (graph-order liveness); the pipeline refuses the copy above
``options['max_memory_ratio']``.

Before: a ``CellGrid`` (cells partitioned). After: unchanged; returns a
``BatchingCost``::

    BatchingCost(weight_copy_bytes=23.4e6, matmul_flops=3.79e9,   # 6.2e-3 B/FLOP: above the rule
                 sequential_peak_bytes=25.3e6)                    # copy_memory_ratio 1.92
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef

from diagpass.ir.cells import CellGrid
from diagpass.fx_facts import example_value, is_sdpa

CPU_COPY_BYTES_PER_FLOP = 4e-3

_LINEAR = {F.linear, torch._C._nn.linear}
_MATMUL = {torch.matmul, operator.matmul, torch.bmm, torch.mm, torch.baddbmm, torch.addmm}


@dataclasses.dataclass(frozen=True)
class BatchingCost:
    weight_copy_bytes: int  # one call's torch.stack of every layer weight
    matmul_flops: int  # linear/matmul/attention FLOPs of all cells
    # the sequential graph's peak bytes run in graph order: inputs (weights too) plus
    # the live intermediates, each storage once (views share it), freed after its last use
    sequential_peak_bytes: int = 0

    @property
    def copy_memory_ratio(self) -> float:
        """Peak memory of a copying batched call over the sequential peak, at most:
        the stacks live for the whole call."""
        peak = self.sequential_peak_bytes
        return (peak + self.weight_copy_bytes) / peak if peak else math.inf

    @property
    def bytes_per_flop(self) -> float:
        return self.weight_copy_bytes / self.matmul_flops if self.matmul_flops else math.inf

    def describe(self) -> str:
        return (
            f"copying {self.weight_copy_bytes / 2**20:.1f} MiB of layer weights per call against "
            f"{self.matmul_flops / 1e9:.2f} GFLOP of layer matmuls ({self.bytes_per_flop:.1e} B/FLOP)"
        )


def _numel(v) -> int:
    return v.numel() if isinstance(v, torch.Tensor) and all(isinstance(d, int) for d in v.shape) else 0


def _arg_value(node, i: int, name: str):
    """Example value of argument ``i`` / keyword ``name`` (transformers 4.46
    GPT-NeoX calls SDPA with ``query=``, ``key=``), or None."""
    a = node.args[i] if len(node.args) > i else node.kwargs.get(name)
    return example_value(a) if hasattr(a, "meta") else None


def node_flops(node) -> int:
    if node.op != "call_function":
        return 0
    out = example_value(node)
    if node.target in _LINEAR or node.target in _MATMUL:
        a = example_value(node.args[0]) if node.args else None
        if isinstance(a, torch.Tensor) and a.dim() > 0 and isinstance(a.shape[-1], int):
            return 2 * _numel(out) * a.shape[-1]
        return 0
    if is_sdpa(node):
        q, k = _arg_value(node, 0, "query"), _arg_value(node, 1, "key")
        if isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(k.shape[-2], int):
            return 4 * _numel(q) * k.shape[-2]  # QK^T and PV
    return 0


def estimate_cost(grid: CellGrid) -> BatchingCost:
    """Weight bytes a copying batched call stacks, and the cells' matmul FLOPs."""
    weights = 0
    for p in grid.stack.param_layer:
        v = example_value(p)
        weights += _numel(v) * v.element_size() if isinstance(v, torch.Tensor) else 0
    flops = sum(node_flops(n) for cell in grid.cells.values() for n in cell.nodes)
    return BatchingCost(int(weights), int(flops), sequential_peak_bytes(grid.gm))


def _storages(value):
    """(storage key, bytes) of every tensor in an example value (tuples flattened)."""
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        nbytes = storage.nbytes()
        if isinstance(nbytes, int):  # a view of a tensor of symbolic size may have a static shape
            yield StorageWeakRef(storage), nbytes
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _storages(v)


def sequential_peak_bytes(gm: fx.GraphModule) -> int:
    """Peak bytes of ``gm`` run node by node in graph order: every storage from
    its first node to the last node that reads it or a view of it (inputs and
    outputs: the whole call). An eager-order estimate from the example values;
    Inductor's fused code allocates fewer intermediates."""
    nodes = list(gm.graph.nodes)
    owners = {}  # node -> its storages
    last = {}  # storage -> index of its last use
    size = {}
    for i, n in enumerate(nodes):
        owners[n] = list(_storages(example_value(n))) if n.op != "output" else []
        for key, nbytes in owners[n]:
            size[key] = nbytes
            last[key] = len(nodes) if n.op == "placeholder" else max(last.get(key, i), i)
        for a in n.all_input_nodes:
            for key, _ in owners.get(a, ()):
                last[key] = max(last[key], len(nodes) if n.op == "output" else i)
    freed_after = {}
    for key, i in last.items():
        freed_after.setdefault(i, []).append(key)
    live, current, peak = set(), 0, 0
    for i, n in enumerate(nodes):
        for key, _ in owners[n]:
            if key not in live:
                live.add(key)
                current += size[key]
        peak = max(peak, current)
        for key in freed_after.get(i, ()):
            live.discard(key)
            current -= size[key]
    return peak
