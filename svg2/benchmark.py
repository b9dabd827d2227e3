"""The shared benchmark module: timing helpers, the whole SVG2 call as users run it, and result rows.

Everything here times the public call, :func:`svg2.svg2_attention`, never a copy of it. Three timings of
one call:

* **eager**: issued on an idle GPU, so waits for the host count (launch-bound at small shapes);
* **ahead**: issued while a queued GPU sleep keeps the GPU busy, as inside a model's forward (the
  projections before the attention keep it busy): the events then time GPU work without host waits;
* **graph**: the call captured once and replayed as one CUDA graph (the sparse path has no host sync).

Phases (k-means, selection, permutation, metadata, attention) come from the call's own
:class:`~svg2.timing.ComponentTimer` sections. Rows are plain dicts written as Markdown + JSON.

Whole-transformer benchmarks (``experiments/bench_e2e.py``, ``experiments/bench_parallel.py``) share the
random-weight Wan transformers of :data:`WAN_TRANSFORMERS` (speed does not depend on the weights).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from svg2.attention import ClusterState, svg2_attention
from svg2.config import SVG2Config
from svg2.layout import ClusterLayout
from svg2.timing import ComponentTimer

__all__ = ["PHASES", "repeat_ms", "time_ms", "graph_ms", "busy_cycles_per_ms", "dense_ms", "WholeCall", "write_rows",
           "WAN_TRANSFORMERS", "peak_gb", "reset_peak"]

PHASES = ("kmeans", "selection", "permutation", "metadata", "attention")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def repeat_ms(fn: Callable[[], Any], device: torch.device, repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``fn()``: CUDA events on a GPU, the wall clock on CPU."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_ms(fn: Callable[[], Any], device: torch.device, budget_ms: float = 400.0, min_reps: int = 3,
            max_reps: int = 100) -> float:
    """Median milliseconds of ``fn()`` after one warm-up call (:func:`repeat_ms`); as many repeats as fit
    ``budget_ms`` within [min_reps, max_reps]."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    one = (time.perf_counter() - t0) * 1e3
    reps = int(min(max_reps, max(min_reps, budget_ms / max(one, 1e-3))))
    return statistics.median(repeat_ms(fn, device, reps))


def graph_ms(fn: Callable[[], Any], reps: int = 20) -> float:
    """Median milliseconds of ``fn`` captured once and replayed as a CUDA graph (GPU only)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up on the capture stream (compiles, allocates)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(reps + 1):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    del graph
    return statistics.median(times[1:])


def busy_cycles_per_ms() -> float:
    """GPU clock cycles per millisecond of ``torch.cuda._sleep`` (measured: the clock is not exposed)."""
    torch.cuda._sleep(1_000_000)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    torch.cuda._sleep(20_000_000)
    b.record()
    b.synchronize()
    return 20_000_000 / a.elapsed_time(b)


def dense_ms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, budget_ms: float = 400.0) -> float:
    """Dense attention, the baseline of every speedup: cuDNN SDPA on a GPU (the fastest there), SDPA on CPU."""
    if q.device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return time_ms(lambda: F.scaled_dot_product_attention(q, k, v), q.device, budget_ms)
    return time_ms(lambda: F.scaled_dot_product_attention(q, k, v), q.device, budget_ms)


class WholeCall:
    """One warm-started ``svg2_attention`` call on fixed inputs, as a model's layer makes it every step.

    The first call (at construction) is the cold start (``cfg.kmeans_iters_init`` iterations, chain order of
    key clusters); every timed call is a warm one (``cfg.kmeans_iters_step``), exactly the public path:
    validation (without the finite check, a host sync), k-means, selection, layout, plan, attention.
    """

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: SVG2Config) -> None:
        self.q, self.k, self.v, self.cfg = q, k, v, cfg
        self.state = ClusterState()
        self.out, self.layout = svg2_attention(q, k, v, cfg, self.state, check_finite=False)

    def __call__(self, timer: ComponentTimer | None = None) -> torch.Tensor:
        out, self.layout = svg2_attention(self.q, self.k, self.v, self.cfg, self.state, check_finite=False,
                                          timer=timer)
        return out

    @property
    def kernels(self) -> dict[str, str]:
        """The kernels that ran (attention, k-means)."""
        return dict(self.state.last_kernels)

    def last_layout(self) -> ClusterLayout:
        return self.layout

    def phases(self, reps: int = 10, lead_ms: float = 0.0) -> dict[str, float]:
        """Median milliseconds per phase and ``total`` over ``reps`` calls. ``lead_ms`` > 0 (GPU) queues a GPU
        sleep of that long before each call, so the host issues it while the GPU is busy ("ahead")."""
        dev = self.q.device
        cycles = int(lead_ms * busy_cycles_per_ms()) if lead_ms > 0 and dev.type == "cuda" else 0
        self()
        per: dict[str, list[float]] = {}
        for _ in range(reps):
            timer = ComponentTimer()
            if cycles:
                torch.cuda._sleep(cycles)
            if dev.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                self(timer)
                b.record()
                b.synchronize()
                total = a.elapsed_time(b)
            else:
                t0 = time.perf_counter()
                self(timer)
                total = (time.perf_counter() - t0) * 1e3
            for name, s in timer.summary().items():
                per.setdefault(name, []).append(s["total_ms"])
            per.setdefault("total", []).append(total)
        return {name: statistics.median(v) for name, v in per.items()}

    def graph_ms(self, reps: int = 20) -> float:
        return graph_ms(self, reps)


def _fmt(x: Any, nd: int = 2) -> str:
    if isinstance(x, float):
        return "nan" if x != x else f"{x:.{nd}f}"
    return str(x)


def write_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str], out_dir: Path | str, name: str,
               header: str = "") -> Path:
    """Rows as ``<out_dir>/<name>.md`` (the given columns) and ``<name>.json`` (every field); returns the md path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(list(rows), indent=1, default=str))
    lines = [header, ""] if header else []
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, float("nan"))) for c in columns) + " |" for r in rows]
    md = out / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    return md


# -- whole transformers ------------------------------------------------------------------------------------

_WAN_COMMON = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
                   cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_TRANSFORMERS: dict[str, dict[str, Any]] = {
    # Wan 2.1 T2V 1.3B, 832x480, 81 frames -> latent 21 x 60 x 104 -> 32760 tokens
    "wan1.3b": dict(label="Wan2.1-1.3B 480p 81f", latent=(21, 60, 104), text_len=512, clusters=(100, 500),
                    config=dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30)),
    # Wan 2.1 T2V 14B, 1280x720, 81 frames -> latent 21 x 90 x 160 -> 75600 tokens
    "wan14b": dict(label="Wan2.1-14B 720p 81f", latent=(21, 90, 160), text_len=512, clusters=(300, 1000),
                   config=dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40)),
    # CPU smoke tests of the benchmarks
    "tiny": dict(label="tiny (CPU smoke)", latent=(3, 8, 8), text_len=16, clusters=(8, 16),
                 config=dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=64, num_layers=2, text_dim=32)),
}


def peak_gb(device: torch.device) -> float | None:
    """Peak allocated GPU memory in GiB since the last :func:`reset_peak` (None on the CPU)."""
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
