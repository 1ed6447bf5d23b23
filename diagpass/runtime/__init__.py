"""What runs per call, below the passes: nothing here imports a pass, the pipeline or the backend.

- ``batched_cell``: ``BatchedCell``, one cell's subgraph run for a whole group (vmap;
  SDPA, cat and the row-wise RNN cells run directly on the stacked values);
- ``row_wise``: the ops vmap cannot batch that are independent per batch row;
- ``kernel_cache``: the compiled-step cache behind ``roll`` (symbolic group size);
- ``lower``: the batch pass's ``GroupCall`` IR -> the modules above;
- ``checks``: trial traces of each group and the fake-tensor check of a lowered graph;
- ``dispatch``: which compiled variant a call runs (stacked views / copying / sequential);
- ``inner``: the inner compilers and the Inductor options of rewritten graphs;
- ``subgraphs`` / ``subgraph_aliasing``: each distinct call one ``invoke_subgraph``;
- ``segment_steps``: the sequential graph's steps (one per segment), each distinct one
  compiled once, cached process-wide.
"""
