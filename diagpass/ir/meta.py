"""The ``node.meta`` keys the passes exchange, each with its contract.

Written once here. A key is set by exactly one stage and read by later ones;
``diagpass/ir/invariants.py`` checks the contracts it can at stage boundaries.
"""

from typing import NamedTuple, Optional

# Set by passes/functionalize.py on an in-place node whose written tensor it
# proved private (a clone of its own, no other reader): data edges alone then
# order it, and partition / schedule accept it as a pure op.
PRIVATE_WRITE = "diagpass_private_write"

# Set by passes/autocast.py on every node an autocast region covered: the
# regions' enter arguments, outermost first. Read by schedule (a cell whose
# nodes disagree has no signature), batch (a group's call inherits it) and
# restored as enter/exit around runs of equal values by autocast after batch.
AUTOCAST = "diagpass_autocast"

# Set by passes/inline_subgraphs.py on each node inlined from an
# ``invoke_subgraph`` call: the call's name.
REGION = "diagpass_region"

# Set by passes/batch.py on the ``torch.stack`` of one layer-weight role (the
# role name); passes/stacked_weights.py turns each such node into an input.
WEIGHT_STACK = "diagpass_weight_stack"

# Set by passes/batch.py on every node copied unchanged from the input graph:
# its ``example_value`` is the original's, so the fake check may reuse it
# while the node's inputs carry the original metadata.
COPIED = "diagpass_copied"

# Set by passes/batch.py on the ``getitem`` that stands for a cell output
# after batching: that output's fake value (the fake check compares with it).
REPLACES = "diagpass_replaces"

# Set by passes/batch.py on every compute node it emits: (wavefront index, role),
# the index -1 for glue emitted before the first wavefront (it reads no cell),
# role "group" for a group's nodes (its stacks, call, results, or a cell copied
# node for node) and "glue" for glue. passes/wavefront_steps.py cuts by it.
WAVEFRONT = "diagpass_wavefront"

# Set by passes/width_free.py on a group input it moved out of its wavefront step
# (the stack of the group's rows, a slice of a weight stack), a ``GroupRows``. A step's
# placeholder copies it; runtime/segment_steps.py compiles such a step for a symbolic G.
GROUP_INPUT = "diagpass_group_input"


class GroupRows(NamedTuple):
    """A group input's leading dim: the width G of the group ``call`` less ``fewer``
    (0 for a stack of all G rows, 1 for the rows a step's entering segment is cat
    to); ``fewer`` None where the leading dim is not known to follow G."""

    call: str
    fewer: Optional[int]
