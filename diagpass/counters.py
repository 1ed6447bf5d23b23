"""Rewrite counters, in the style of ``torch._dynamo.utils.counters``.

Every pass bumps ``counters[<pass>][<event>]``; tests read them to check that
batching really happened (how many wavefronts, how many cells batched), not
only that outputs match. ``counters.clear()`` resets them.
"""

import collections

counters: "collections.defaultdict[str, collections.Counter]" = collections.defaultdict(
    collections.Counter
)
