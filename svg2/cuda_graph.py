"""Opt-in CUDA-graph replay of SVG2's warm sparse call (``SVG2Config.cuda_graph``; issue 18).

An eager sparse call is host-bound on small models (Wan 2.1 1.3B at 480p: ~10.5 ms eager, ~6.0 ms as one graph,
``svg2.benchmark.graph_ms``). With ``cuda_graph=True`` the svg2 method hands every sparse call to the
:class:`GraphCache` of its pipeline (one per :class:`~svg2.methods.MethodState`, owned by the handle that
``enable_svg2`` returns; no module globals). Per call site (layer x CFG branch) and input signature (shape,
strides, dtype, device, scale, and the SVG2Config itself: a graph bakes in every knob):

1. the cold call (``kmeans_iters_init`` iterations, CPU-drawn initial centroids) always runs eagerly;
2. the first ``EAGER_WARM_CALLS`` warm calls run eagerly (Triton compiles and autotunes there, never in a capture);
3. the next warm call copies q, k, v and the site's centroids into static buffers, runs once on a side stream
   (its result is this call's result) and is captured into a ``torch.cuda.CUDAGraph`` (k-means warm iterations,
   selection, layout, kernel plan, attention, and in-place ``copy_`` of the new centroids into the static
   centroid buffers); if the capture raises, that site and signature stay eager (the reason is logged);
4. later calls copy q, k, v in, replay, and return a clone of the static output.

The k-means state: eager ``svg2_attention`` *rebinds* ``ClusterState.q_centroids`` / ``k_centroids`` to fresh
tensors; a graph reads the addresses it saw at capture, so the graph path keeps per-site static centroid buffers,
updates them in place inside the graph and points the site's ClusterState at them after every replay. When the
state holds other tensors (a new video's cold start, ``seed_centroids_in_warmup``, an eager fallback call), they
are copied into the static buffers before the replay: every replay starts from the site's current centroids.

Static q/k/v/output buffers are shared by every graph of one signature in a pipeline (sites run one after the
other on one stream; the output is cloned right after the replay), and all graphs of a pipeline share one memory
pool: every tensor a graph keeps is a buffer allocated outside the capture, so the pool holds only intermediates
of one replay at a time.

Refused (the call runs eagerly, the reason is logged once per pipeline): non-CUDA inputs or torch without CUDA
graphs; a call inside another capture (``torch.compile(mode="reduce-overhead")``); ``check_finite`` (a host
sync); ``compensate`` (its backend fallback catches kernel errors at run time); ``layout_every > 1`` (which call
rebuilds the layout is host control flow); joint text tokens / text masks and sequence-parallel head slices
(not verified); autograd; more than ``MAX_GRAPHS_PER_SITE`` signatures at one site. See notes/cuda_graph_replay.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from svg2.attention import ClusterState, _cold, svg2_attention

__all__ = ["GraphCache", "CudaGraphBackend", "EAGER_WARM_CALLS", "MAX_GRAPHS_PER_SITE", "refusal"]

log = logging.getLogger(__name__)

EAGER_WARM_CALLS = 1  # warm calls per site and signature that run eagerly before the capture
MAX_GRAPHS_PER_SITE = 4  # signatures captured per site; more run eagerly


class CudaGraphBackend:
    """Captures with ``torch.cuda.CUDAGraph``. A test injects a fake with the same three methods."""

    name = "cuda"

    def unavailable(self, device: torch.device) -> str | None:
        """Why a graph cannot be captured for inputs on ``device`` now (None: it can)."""
        if device.type != "cuda":
            return f"inputs on {device.type}, not on a CUDA device"
        if not torch.cuda.is_available() or not hasattr(torch.cuda, "CUDAGraph"):
            return "this torch has no CUDA graphs"
        if torch.cuda.is_current_stream_capturing():
            return "the call runs inside another CUDA-graph capture (e.g. torch.compile mode='reduce-overhead')"
        return None

    def new_pool(self) -> Any:
        return torch.cuda.graph_pool_handle()

    def warmup(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once on a side stream, the warm-up PyTorch asks for before a capture. Its effects are this
        call's result."""
        cur = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            fn()
        cur.wait_stream(side)

    def capture(self, fn: Callable[[], None], pool: Any) -> Callable[[], None]:
        """Capture ``fn`` (executes nothing) and return the replay."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            fn()
        return graph.replay


def refusal(cfg: Any, ctx: Any, q: torch.Tensor) -> str | None:
    """Why this call may not be captured whatever the device (None: it may). ``ctx``: the AttentionContext."""
    if getattr(ctx, "check_finite", False):
        return "check_finite=True: the NaN/Inf check is a host sync (enable_svg2(..., check_finite=False))"
    if cfg.compensate:
        return "compensate=True: the compensation backend falls back on kernel errors at run time (not capturable)"
    if cfg.layout_every > 1:
        return "layout_every > 1: whether a call rebuilds or reuses the layout is host control flow"
    if ctx.num_text_tokens or ctx.text_mask is not None:
        return "joint text tokens / text mask: not supported by the graph path (not verified under capture)"
    if ctx.heads is not None:
        return "sequence-parallel head slice (Ulysses): not supported by the graph path"
    if torch.is_grad_enabled() and q.requires_grad:
        return "autograd is recording: graph replay is for inference (run under torch.no_grad())"
    return None


@dataclass
class _Buffers:
    """Static inputs and output of one signature, shared by the graphs of every site of a pipeline."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor


@dataclass
class _Graph:
    replay: Callable[[], None] | None  # None: the capture failed
    buffers: _Buffers
    q_centroids: torch.Tensor  # static, this site's: updated in place by every replay
    k_centroids: torch.Tensor
    density: torch.Tensor  # static float64 scalar: the call's mean density (as ``density_per_head().mean()``)
    kernels: dict[str, str] = field(default_factory=dict)


@dataclass
class _Site:
    warm_eager: dict[tuple, int] = field(default_factory=dict)
    graphs: dict[tuple, _Graph] = field(default_factory=dict)
    failed: set[tuple] = field(default_factory=set)  # signatures whose capture raised: eager from then on


class GraphCache:
    """The CUDA graphs of one pipeline (one MethodState): per site and signature. See the module docstring.

    ``call`` returns ``(out, density)`` when the call ran from a graph (captured now or replayed), or None when
    the caller must run it eagerly. ``events`` counts what happened (eager_cold, eager_warm, capture, replay,
    refused, full, capture_failed, eager_failed) for tests and stats."""

    def __init__(self, backend: Any = None, *, eager_warm_calls: int = EAGER_WARM_CALLS,
                 max_graphs_per_site: int = MAX_GRAPHS_PER_SITE) -> None:
        self.backend = backend if backend is not None else CudaGraphBackend()
        self.eager_warm_calls = int(eager_warm_calls)
        self.max_graphs_per_site = int(max_graphs_per_site)
        self.sites: dict[tuple, _Site] = {}
        self.buffers: dict[tuple, _Buffers] = {}
        self.pool: Any = None
        self.events: dict[str, int] = {}
        self.reasons: list[str] = []  # every reason logged (once each)

    def _count(self, what: str) -> None:
        self.events[what] = self.events.get(what, 0) + 1

    def _say(self, reason: str) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)
            log.warning("svg2 cuda_graph: running eagerly: %s", reason)

    def num_graphs(self) -> int:
        return sum(len(s.graphs) for s in self.sites.values())

    def call(self, cfg: Any, state: ClusterState, site: tuple, q: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor, ctx: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        reason = refusal(cfg, ctx, q) or self.backend.unavailable(q.device)
        if reason is not None:
            self._count("refused")
            self._say(reason)
            return None
        b, h, s, d = q.shape
        cq, ck = min(cfg.num_q_centroids, s), min(cfg.num_k_centroids, s)
        if _cold(state, b * h, cq, ck, d):  # cold start: eager (many iterations, CPU-drawn initial centroids)
            self._count("eager_cold")
            return None
        # The config is part of the signature: a graph bakes in every knob (a benchmark that changes
        # target_density between runs gets a new graph, not a replay at the old density).
        sig = (tuple(q.shape), tuple(q.stride()), tuple(k.stride()), tuple(v.stride()), q.dtype, str(q.device),
               ctx.scale, cfg)
        st = self.sites.setdefault(site, _Site())
        g = st.graphs.get(sig)
        if g is None:
            if sig in st.failed:
                self._count("eager_failed")
                return None
            if len(st.graphs) >= self.max_graphs_per_site:
                self._count("full")
                self._say(f"more than {self.max_graphs_per_site} input signatures at one call site")
                return None
            seen = st.warm_eager.get(sig, 0)
            if seen < self.eager_warm_calls:
                st.warm_eager[sig] = seen + 1
                self._count("eager_warm")
                return None
            g = self._capture(cfg, state, sig, q, k, v, ctx.scale)
            if g.replay is None:
                st.failed.add(sig)
                self._count("capture_failed")
            else:
                st.graphs[sig] = g
                self._count("capture")
        else:
            self._load(g, state, q, k, v)
            g.replay()
            self._count("replay")
        state.q_centroids, state.k_centroids = g.q_centroids, g.k_centroids
        state.calls += 1
        state.last_kernels.update(g.kernels)
        state.last_layout_reused = False
        return g.buffers.out.clone(), g.density.clone()

    @staticmethod
    def _load(g: _Graph, state: ClusterState, q, k, v) -> None:
        g.buffers.q.copy_(q)
        g.buffers.k.copy_(k)
        g.buffers.v.copy_(v)
        # Centroids that are not this graph's buffers (a new video's cold start, warm-up seeding, an eager call):
        # copy them in, so the replay starts from the site's current state.
        if state.q_centroids is not g.q_centroids:
            g.q_centroids.copy_(state.q_centroids)
        if state.k_centroids is not g.k_centroids:
            g.k_centroids.copy_(state.k_centroids)

    def _capture(self, cfg, state: ClusterState, sig: tuple, q, k, v, scale) -> _Graph:
        bufs = self.buffers.get(sig)
        if bufs is None:  # allocated outside any capture: graphs keep no tensor of the shared pool
            bufs = _Buffers(torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
                            torch.empty(q.shape, dtype=q.dtype, device=q.device))
            self.buffers[sig] = bufs
        g = _Graph(replay=lambda: None, buffers=bufs, q_centroids=state.q_centroids.clone(),
                   k_centroids=state.k_centroids.clone(), density=torch.zeros((), dtype=torch.float64,
                                                                                device=q.device))
        self._load(g, state, q, k, v)
        kernels = g.kernels

        def fn() -> None:
            # Only the static buffers are read and written: what a replay does is what this does.
            tmp = ClusterState(q_centroids=g.q_centroids, k_centroids=g.k_centroids)
            out, layout = svg2_attention(bufs.q, bufs.k, bufs.v, cfg, tmp, scale=scale, check_finite=False)
            bufs.out.copy_(out)
            g.q_centroids.copy_(tmp.q_centroids)  # in place: the next replay reads these addresses
            g.k_centroids.copy_(tmp.k_centroids)
            g.density.copy_(layout.density_per_head().mean())
            kernels.update(tmp.last_kernels)

        self.backend.warmup(fn)  # this call's result (an error here is the eager call's own error)
        if self.pool is None:
            self.pool = self.backend.new_pool()
        try:
            g.replay = self.backend.capture(fn, self.pool)
        except Exception as e:  # a host sync or an uncapturable op on this path: this signature stays eager
            g.replay = None
            self._say(f"capture failed ({type(e).__name__}: {e}); this site and input signature run eagerly")
        return g
