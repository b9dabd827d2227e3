"""The handle that ``enable_svg2`` returns, and the step tracker that tells processors where the loop is.

Where the denoising loop is (step index, number of steps, CFG branch) reaches the processors without
subclassing the model:

* ``cache_context``: diffusers pipelines wrap every transformer call in ``transformer.cache_context(name,
  step_index=..., num_inference_steps=...)`` (Wan T2V passes the step; Wan I2V and HunyuanVideo pass only the
  branch name). We wrap that method on the instance and remember the context.
* a forward pre-hook on the transformer turns the remembered context into ``(step_index, branch)``. When the
  context carries no step index, a call in a branch already seen at the current step starts the next step
  (cond, uncond, cond, ... or cond, cond, ... without CFG). The counter is shared by all experts of a pipeline
  (Wan 2.2 A14B switches expert mid-loop, the step index is global).
* ``scheduler.set_timesteps`` (wrapped on the pipeline's scheduler instance): every pipeline call runs it once
  before the loop; it gives the number of steps and resets all state (a new video).

The step counter changes every call, so it must never become a guard of a compiled graph. The pre-hook runs
under ``torch.compiler.disable``; the attention core, inside a graph being compiled, is one opaque custom op
(``torch.ops.svg2.attention_site``, :mod:`svg2.integrations.opaque`) that reads the counter when it runs: a
compiled transformer block has no graph break and no recompile per step. (Under Ulysses context parallelism the
core still runs behind ``torch.compiler.disable``: one graph break per attention call.)
"""

from __future__ import annotations

import contextlib
import functools
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from svg2.integrations.opaque import register_site
from svg2.methods import AttentionContext, AttentionMethod, MethodState
from svg2.timing import ComponentTimer

__all__ = ["SVG2Handle", "StepTracker", "AttentionCore"]


class StepTracker:
    """Where the denoising loop is. One per pipeline (shared by its experts); owned by the handle."""

    def __init__(self, num_steps: int | None = None) -> None:
        self.num_steps = num_steps
        self.step_index = -1
        self.branch = "cond"
        self.manual = False
        self.context: tuple[str, dict[str, Any]] | None = None  # set by the cache_context wrapper
        self.video_shape: tuple[int, int, int] | None = None  # (frames, height, width) in tokens
        self._seen: set[str] = set()

    def begin_video(self, num_steps: int | None = None) -> None:
        if num_steps is not None:
            self.num_steps = int(num_steps)
        self.step_index = -1
        self.branch = "cond"
        self.manual = False
        self._seen = set()

    def advance(self) -> bool:
        """Update step and branch for the transformer call about to run. Returns True when the context's
        explicit step index went backwards (a new video on a bare transformer: the caller resets)."""
        if self.manual:
            return False
        name, kw = self.context if self.context is not None else ("cond", {})
        self.branch = str(name)
        if kw.get("num_inference_steps") is not None:
            self.num_steps = int(kw["num_inference_steps"])
        step = kw.get("step_index")
        went_back = False
        if step is not None:
            step = int(step)
            went_back = step < self.step_index
            if step != self.step_index:
                self._seen = set()
            self.step_index = step
        elif self.step_index < 0 or self.branch in self._seen:
            self.step_index += 1
            self._seen = set()
        self._seen.add(self.branch)
        if self.num_steps is None:
            raise RuntimeError(
                "svg2 does not know the number of denoising steps. Call enable_svg2 on the pipeline (the "
                "scheduler's set_timesteps gives it), pass enable_svg2(..., num_steps=N), or drive the loop "
                "yourself with handle.set_step(step_index, num_steps=N, branch=...)")
        return went_back


class AttentionCore:
    """Runs the attention method for one call site (one transformer block). Inputs and output in diffusers'
    layout (batch, seqlen, heads, headdim); the method sees (batch, heads, seqlen, headdim)."""

    def __init__(self, method: AttentionMethod, state: MethodState, tracker: StepTracker, layer_index: int,
                 check_finite: bool) -> None:
        self.method = method
        self.state = state
        self.tracker = tracker
        self.layer_index = layer_index
        self.check_finite = check_finite
        # Opaque to dynamo: the step index is read here, so it never becomes a guard of a compiled graph.
        self._run = torch.compiler.disable(self._run_impl)
        # What a compiled graph passes to the custom op to name this call site (see svg2.integrations.opaque).
        self._site = register_site(self)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_text_tokens: int = 0,
                 text_mask: torch.Tensor | None = None, parallel_config: Any = None) -> torch.Tensor:
        if parallel_config is not None:  # diffusers' context parallelism: q, k, v hold a sequence shard
            from svg2.parallel.ulysses import ulysses_attention, ulysses_group

            group = ulysses_group(parallel_config)
            if group is not None:
                return ulysses_attention(self._run, q, k, v, group, num_text_tokens=num_text_tokens,
                                         text_mask=text_mask)
        if torch.compiler.is_compiling():  # one opaque op in the graph: no graph break
            return torch.ops.svg2.attention_site(q, k, v, self._site, num_text_tokens, text_mask)
        return self._run(q, k, v, num_text_tokens, text_mask, None)

    def _run_impl(self, q, k, v, num_text_tokens, text_mask, heads):
        t = self.tracker
        ctx = AttentionContext(
            layer_index=self.layer_index, step_index=max(t.step_index, 0), num_steps=t.num_steps or 1,
            branch=t.branch, num_text_tokens=num_text_tokens, text_mask=text_mask, scale=None, state=self.state,
            check_finite=self.check_finite, heads=heads,
            extra={} if t.video_shape is None else {"video_shape": t.video_shape},
        )
        with self._timed(q.device):
            out = self.method(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), ctx)
        return out.transpose(1, 2)

    @contextlib.contextmanager
    def _timed(self, device: torch.device):
        """With a timer: every section of this call is also kept under the layer index, and "site_call" is the
        whole method call (in a dense step: the dense attention of this layer). Without one: nothing."""
        timer = self.state.timer
        if timer is None:
            yield
            return
        with timer.tagged(self.layer_index), timer.section("site_call", device):
            yield


class SVG2ProcessorBase:
    """What every svg2 attention processor shares: the attention core of its call site, the stock processor it
    replaced (it handles every call that is not the self-attention we sparsify), and diffusers' context-parallel
    config, which ``enable_parallelism`` sets on processors that have the attribute."""

    _parallel_config = None

    def __init__(self, core: AttentionCore, stock) -> None:
        self.core = core
        self.stock = stock
        # enable_parallelism may have run before enable_svg2: inherit the stock processor's config.
        self._parallel_config = getattr(stock, "_parallel_config", None)


def latent_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The transformer's latent input (``hidden_states``), positional or keyword."""
    hs = kwargs.get("hidden_states", args[0] if args else None)
    return hs if isinstance(hs, torch.Tensor) else None


def model_config(module: torch.nn.Module) -> Any:
    return getattr(getattr(module, "_orig_mod", module), "config", None)


@dataclass
class _Target:
    """One transformer under SVG2: its name in the pipeline, family, state and what to undo."""

    name: str
    module: torch.nn.Module
    family: str
    state: MethodState
    # (transformer, args, kwargs) -> (frames, height, width) in tokens, or None: the family's video_shape
    video_shape: Any = None
    originals: list[tuple[torch.nn.Module, Any]] = field(default_factory=list)  # (attention module, processor)
    hooks: list[Any] = field(default_factory=list)
    had_cache_context_attr: bool = False
    old_cache_context: Any = None


class SVG2Handle:
    """What ``enable_svg2`` returns: owns the method state of every transformer it patched.

    stats()   density per layer / step / branch, kernels used, time per component (when timing is on)
    reset()   forget centroids and records (done automatically at the start of every pipeline call)
    remove()  restore the stock processors, hooks and wrapped methods exactly
    set_step(step_index, num_steps=None, branch="cond")   drive the loop by hand (bare transformer use)
    """

    def __init__(self, method: AttentionMethod, tracker: StepTracker, timer: ComponentTimer | None) -> None:
        self.method = method
        self.tracker = tracker
        self.timer = timer
        self.targets: list[_Target] = []
        self._scheduler = None
        self._scheduler_had_attr = False
        self._scheduler_old = None
        self.removed = False

    # -- wiring (called by enable_svg2) -------------------------------------------------------------------
    def _attach(self, target: _Target) -> None:
        module = target.module
        target.had_cache_context_attr = "cache_context" in module.__dict__
        target.old_cache_context = module.__dict__.get("cache_context")
        original = module.cache_context if hasattr(module, "cache_context") else None
        tracker = self.tracker

        if original is not None:
            @contextlib.contextmanager
            def cache_context(name: str, **kwargs: Any):
                previous = tracker.context
                tracker.context = (name, kwargs)
                try:
                    with original(name, **kwargs):
                        yield
                finally:
                    tracker.context = previous

            module.cache_context = cache_context

        def pre_hook(mod, args, kwargs):
            self.tracker.video_shape = target.video_shape(mod, args, kwargs) if target.video_shape else None
            if self.tracker.advance():
                self._reset_states()
            return None

        target.hooks.append(module.register_forward_pre_hook(torch.compiler.disable(pre_hook), with_kwargs=True))
        self.targets.append(target)

    def _watch_scheduler(self, scheduler: Any) -> None:
        if scheduler is None or not hasattr(scheduler, "set_timesteps"):
            return
        self._scheduler = scheduler
        self._scheduler_had_attr = "set_timesteps" in vars(scheduler)
        self._scheduler_old = vars(scheduler).get("set_timesteps")
        original = scheduler.set_timesteps

        @functools.wraps(original)  # keeps the signature that pipelines inspect (retrieve_timesteps)
        def set_timesteps(*args: Any, **kwargs: Any):
            result = original(*args, **kwargs)
            timesteps = getattr(scheduler, "timesteps", None)
            self.reset()
            self.tracker.begin_video(len(timesteps) if timesteps is not None else None)
            return result

        scheduler.set_timesteps = set_timesteps

    # -- public -------------------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int | None:
        return self.tracker.num_steps

    @num_steps.setter
    def num_steps(self, value: int) -> None:
        self.tracker.num_steps = int(value)

    def set_step(self, step_index: int, *, num_steps: int | None = None, branch: str = "cond") -> None:
        """Fix the step index and branch of the following transformer calls (turns off automatic counting
        until ``reset()``)."""
        self._check_alive()
        self.tracker.manual = True
        self.tracker.step_index = int(step_index)
        self.tracker.branch = branch
        if num_steps is not None:
            self.tracker.num_steps = int(num_steps)

    def reset(self) -> None:
        """Forget centroid caches, records and timings; restart step counting (keeps num_steps)."""
        self._check_alive()
        self._reset_states()
        self.tracker.begin_video()

    def _reset_states(self) -> None:
        for t in self.targets:
            t.state.reset()
        if self.timer is not None:
            self.timer.reset()

    def records(self) -> list[dict[str, Any]]:
        """One row per attention call: expert, layer, step, branch, density, dense, kernel (one host sync)."""
        rows = []
        for t in self.targets:
            for r in t.state.resolved_records():
                rows.append({"expert": t.name, **r})
        return rows

    def stats(self) -> dict[str, Any]:
        """Summary of the calls since the last reset. Densities are token-pair fractions (1.0 = dense)."""
        rows = self.records()
        by_step: dict[int, list[float]] = defaultdict(list)
        by_layer: dict[int, list[float]] = defaultdict(list)
        by_branch: dict[str, list[float]] = defaultdict(list)
        for r in rows:
            by_step[r["step"]].append(r["density"])
            by_layer[r["layer"]].append(r["density"])
            by_branch[r["branch"]].append(r["density"])
        mean = lambda xs: float(sum(xs) / len(xs)) if xs else None
        sparse = [r["density"] for r in rows if not r.get("dense", False)]
        kernels = sorted({str(r[k]) for r in rows for k in ("kernel", "kmeans_kernel") if r.get(k)})
        return {
            "method": self.method.describe(),
            "experts": [t.name for t in self.targets],
            "families": {t.name: t.family for t in self.targets},
            "num_steps": self.tracker.num_steps,
            "num_calls": len(rows),
            "num_dense_calls": sum(1 for r in rows if r.get("dense", False)),
            "mean_density": mean([r["density"] for r in rows]),
            "mean_sparse_density": mean(sparse),
            "density_per_step": {s: mean(v) for s, v in sorted(by_step.items())},
            "density_per_layer": {layer: mean(v) for layer, v in sorted(by_layer.items())},
            "density_per_branch": {b: mean(v) for b, v in sorted(by_branch.items())},
            "kernels": kernels,
            "timing_ms": self.timer.summary() if self.timer is not None else {},
        }

    def remove(self) -> None:
        """Restore the stock processors (the very objects that were installed before), remove the hooks and
        unwrap cache_context / set_timesteps. Idempotent."""
        if self.removed:
            return
        for t in self.targets:
            t.state.drop_graphs()  # CUDA graphs (SVG2Config.cuda_graph) and their static buffers
            for attn, processor in t.originals:
                attn.processor = processor
            for h in t.hooks:
                h.remove()
            if "cache_context" in t.module.__dict__:
                del t.module.cache_context
            if t.had_cache_context_attr:
                t.module.cache_context = t.old_cache_context
        if self._scheduler is not None:
            if "set_timesteps" in vars(self._scheduler):
                del self._scheduler.set_timesteps
            if self._scheduler_had_attr:
                self._scheduler.set_timesteps = self._scheduler_old
        self.removed = True

    def _check_alive(self) -> None:
        if self.removed:
            raise RuntimeError("this SVG2Handle was removed; call enable_svg2 again")

    def __enter__(self) -> SVG2Handle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        experts = ", ".join(f"{t.name}:{t.family}({len(t.originals)} sites)" for t in self.targets)
        status = "removed" if self.removed else "active"
        return f"SVG2Handle(method={self.method.name!r}, {experts}, {status})"
