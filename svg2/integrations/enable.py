"""``enable_svg2(pipe_or_transformer, cfg, method="svg2") -> SVG2Handle``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from svg2.config import SVG2Config
from svg2.integrations.handle import AttentionCore, StepTracker, SVG2Handle, _Target
from svg2.integrations.registry import detect_family, unwrap_compiled
from svg2.methods import AttentionMethod, MethodState, build_method
from svg2.timing import ComponentTimer

__all__ = ["enable_svg2"]

_EXPERT_ATTRS = ("transformer", "transformer_2")  # Wan 2.2 A14B: high-noise and low-noise experts


def _targets_of(obj: Any) -> tuple[list[tuple[str, torch.nn.Module]], Any]:
    """(name, transformer) pairs and the scheduler (None for a bare transformer)."""
    if isinstance(obj, torch.nn.Module):
        return [("transformer", obj)], None
    found = [(a, getattr(obj, a)) for a in _EXPERT_ATTRS if isinstance(getattr(obj, a, None), torch.nn.Module)]
    if not found:
        raise TypeError(f"enable_svg2 takes a diffusers pipeline (with a .transformer) or a transformer module, "
                        f"got {type(obj).__name__}")
    return found, getattr(obj, "scheduler", None)


def _build(method: str | AttentionMethod, cfg: SVG2Config | Mapping | None, kwargs: dict) -> AttentionMethod:
    if isinstance(method, AttentionMethod):
        if cfg is not None or kwargs:
            raise TypeError("pass cfg / method kwargs to the method's constructor, not with a built method")
        return method
    if isinstance(cfg, Mapping):
        cfg = SVG2Config.from_dict(dict(cfg))
    if cfg is not None:
        kwargs = {"cfg": cfg, **kwargs}
    return build_method(method, **kwargs)


def enable_svg2(
    pipe_or_transformer: Any,
    cfg: SVG2Config | Mapping | None = None,
    method: str | AttentionMethod = "svg2",
    *,
    num_steps: int | None = None,
    timing: bool = False,
    check_finite: bool = False,
    **method_kwargs: Any,
) -> SVG2Handle:
    """Install sparse attention on the self-attention of a diffusers video pipeline or transformer.

    Args:
        pipe_or_transformer: a pipeline (every expert — ``transformer`` and, for Wan 2.2 A14B,
            ``transformer_2`` — is patched, each with its own state) or a transformer module (also one
            wrapped by ``torch.compile``).
        cfg: SVG2Config (or a mapping of its fields) given to the method as ``cfg=``; None: method defaults.
        method: a registered method name (``svg2.available_methods()``) or a built AttentionMethod.
        num_steps: number of denoising steps, needed only for a bare transformer outside a pipeline (a
            pipeline's scheduler gives it).
        timing: record time per component (k-means, selection, permutation, attention, and ``site_call``: the
            whole method call of a site) in ``stats()``; ``handle.timer.summary_by_tag()`` splits them per layer.
        check_finite: check q/k/v for NaN/Inf on sparse calls (one host sync per call; off by default).
        **method_kwargs: more constructor arguments of the method (e.g. ``top_p=1.0`` for svg2).
    Returns:
        SVG2Handle with ``stats()``, ``reset()``, ``remove()`` and ``set_step()``.

    Raises TypeError for unsupported transformers, listing the supported ones.
    """
    pairs, scheduler = _targets_of(pipe_or_transformer)
    modules = [(name, unwrap_compiled(m)) for name, m in pairs]
    families = [detect_family(m) for _, m in modules]  # all checked before anything is patched
    for (name, m), family in zip(modules, families):
        for _, attn in family.sites(m):
            if isinstance(attn.processor, family.processor_cls):
                raise RuntimeError(f"svg2 is already enabled on {name}; call handle.remove() first")

    built = _build(method, cfg, dict(method_kwargs))
    if built.stock:
        raise ValueError(f"{type(built).__name__} is the pipeline's own attention: there is nothing to install "
                         "(run the pipeline as it is)")
    timer = ComponentTimer() if timing else None
    tracker = StepTracker(num_steps)
    handle = SVG2Handle(built, tracker, timer)
    for (name, m), family in zip(modules, families):
        state = MethodState(timer=timer)
        target = _Target(name=name, module=m, family=family.name, state=state, video_shape=family.video_shape)
        for layer, attn in family.sites(m):
            stock = attn.processor
            core = AttentionCore(built, state, tracker, layer, check_finite)
            target.originals.append((attn, stock))
            attn.processor = family.processor_cls(core, stock)
        handle._attach(target)
    handle._watch_scheduler(scheduler)
    return handle
