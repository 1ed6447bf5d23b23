"""Benchmark harness for diagpass (GitHub issue 4).

    python -m benchmarks --quick            # tiny S=4, modes eager/inductor/diagonal/base_eager,
                                            # no memory subprocesses (add --memory); ~3-5 min on 2
                                            # idle CPU cores, compile included
    python -m benchmarks                    # full sweep (long on CPU: unrolled Inductor compiles)
    python -m benchmarks --config small-headline [--segments 8]
    python -m benchmarks --list

Modes are compiled in this process (first call timed; cold unless --keep-cache), then compiled
again from the warm cache in ONE fresh process (benchmarks.timeworker) and timed there side by
side (interleaved rounds, medians); --time-in-process times them where they were compiled:
  eager        the ARMT module, no compile
  inductor     torch.compile(m, backend="diagonal", options={"inner": "inductor", "enabled": False})
               = Inductor sequential baseline (same graph, not rewritten)
  inductor_bl  the same + Optimus batch_linear fusions, pre- and post-grad, min_fuse_set_size=2
               (runner.BATCH_LINEAR_CONFIG: why); the table names those that fired
               (counters["inductor"])
  diagonal     torch.compile(m, backend="diagonal", options={"inner": "inductor"})
  stacked_inline  diag_stacked with shared_subgraphs=False: every call inlined (the unrolled graph)
  seq_inline   diagonal with segment_steps=False: where the cost/memory rule refuses, the
               sequential graph Dynamo gave, inline
  seq_steps    diagonal with segment_steps=True (the default): that fallback as one compiled
               step per segment, each distinct segment compiled once
  diag_cached  diagonal with cache_weight_stacks=True: weights stacked once, kept between calls
  diag_pywrapper / stacked_pywrapper   diagonal / diag_stacked with step_cpp_wrapper=False: the
               steps' kernels called from Inductor's Python wrapper (the C++ one is the default)
  stacked_batched  diag_stacked with measure_band=1: batched, whatever timing the first calls would do
  stacked_glue_in  stacked_batched with glue_steps=False: what enters and leaves at a wavefront
               (embedding, logits) computed in its step, not in steps of its own
  stacked_fixed_width  diag_stacked with symbolic_width=False: each wavefront step compiled for
               its own group width (the default compiles one step for every width)
  rolled       diagonal with roll=True: each distinct batched step compiled once, host loop
  seq_rolled   roll with min_group=10**6: the same host loop, one cell per call (batching off)
  diag_aot     diagonal with inner "aot_eager" (diagnostic: rewrite without Inductor)
  bound        even-load bound (benchmarks.bound): the S segments stacked into the batch dim, one
               pass through the layer stack (steady-state cells), Inductor; the table's "bound
               share" = (t_seq - t_mode) / (t_seq - t_bound)
  base_eager / base_inductor   the HF base model WITHOUT memory, full attention over the same
               S*T tokens (no memory tokens), eager / default torch.compile

Peak memory: one subprocess per mode (benchmarks.memworker). Linux VmHWM from /proc/self/status,
reset with `echo 5 > /proc/self/clear_refs` after compile+warm-up and after returning freed heap
to the OS (gc.collect + glibc malloc_trim: the compile frees far more than it keeps, and glibc
would otherwise keep it resident), so `steady_hwm_mb` is the absolute RSS high-water of one
steady-state call (the issue-4 "peak memory"), `steady_peak_mb` the
RSS high-water of one steady-state call minus the RSS just before it, and `compile_peak_mb` is the
high-water during the first (compiling) call minus the RSS before it. On CUDA:
torch.cuda.max_memory_allocated around one call instead.
"""
