"""Per-component timing without syncs on the timed path.

On CUDA, sections record event pairs that are only resolved (synchronised) when ``summary()`` is called;
on the CPU they use ``time.perf_counter``. A disabled timer costs nothing.

Sections opened inside ``with timer.tagged(tag):`` are also kept under that tag (an attention call site's
layer index, set by ``AttentionCore``), so ``summary_by_tag()`` splits every component per layer.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Hashable, Iterator
from contextlib import contextmanager

import torch

__all__ = ["ComponentTimer"]


def _stats(ms: list[float]) -> dict[str, float]:
    return {"total_ms": float(sum(ms)), "calls": len(ms), "mean_ms": float(sum(ms) / len(ms))}


class ComponentTimer:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.tag: Hashable | None = None
        # name -> [(tag, start event, end event)] / [(tag, ms)]
        self._events: dict[str, list] = defaultdict(list)
        self._cpu_ms: dict[str, list[tuple[Hashable | None, float]]] = defaultdict(list)

    @contextmanager
    def tagged(self, tag: Hashable | None) -> Iterator[None]:
        """Sections opened inside are kept under ``tag`` too (nesting restores the outer tag)."""
        previous, self.tag = self.tag, tag
        try:
            yield
        finally:
            self.tag = previous

    @contextmanager
    def section(self, name: str, device: torch.device | None = None):
        if not self.enabled:
            yield
            return
        tag = self.tag
        if device is not None and device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events[name].append((tag, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._cpu_ms[name].append((tag, (time.perf_counter() - t0) * 1e3))

    def _resolved(self) -> dict[str, list[tuple[Hashable | None, float]]]:
        """{section: [(tag, ms)]} (synchronises CUDA once)."""
        if self._events:
            torch.cuda.synchronize()
        out: dict[str, list[tuple[Hashable | None, float]]] = defaultdict(list)
        for name, events in self._events.items():
            out[name] += [(tag, s.elapsed_time(e)) for tag, s, e in events]
        for name, rows in self._cpu_ms.items():
            out[name] += rows
        return out

    def summary(self) -> dict[str, dict[str, float]]:
        """{section: {"total_ms", "calls", "mean_ms"}} (synchronises CUDA once)."""
        resolved = self._resolved()
        return {name: _stats([ms for _, ms in resolved[name]]) for name in sorted(resolved)}

    def summary_by_tag(self) -> dict[Hashable, dict[str, dict[str, float]]]:
        """{tag: {section: {"total_ms", "calls", "mean_ms"}}} over the sections opened under a tag."""
        per: dict[Hashable, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for name, rows in self._resolved().items():
            for tag, ms in rows:
                if tag is not None:
                    per[tag][name].append(ms)
        return {tag: {name: _stats(ms) for name, ms in sorted(per[tag].items())} for tag in per}

    def reset(self) -> None:
        self._events.clear()
        self._cpu_ms.clear()
