"""GPU-aware timing helpers shared by the benchmark scripts (CUDA events on CUDA, wall clock elsewhere)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    """Median ms of `fn` over `reps` calls, after `warmup` calls (which also compile)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_gib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory of one call above what was allocated before it (the inputs), GiB; None off CUDA."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def graph_time_ms(fn: Callable[[], object], reps: int = 20, calls_per_graph: int = 10) -> float:
    """Median GPU ms of one `fn` call replayed from a CUDA graph (no CPU launch cost in the figure: what a
    decode loop under CUDA graphs, as vLLM runs it, pays). `fn` must be capturable (no host syncs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls_per_graph):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    return time_ms(graph.replay, torch.device("cuda"), 1, reps) / calls_per_graph
