"""Per-component timing without syncs on the timed path.

On CUDA, sections record event pairs that are only resolved (synchronised) when ``summary()`` is called;
on the CPU they use ``time.perf_counter``. A disabled timer costs nothing.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch

__all__ = ["ComponentTimer"]


class ComponentTimer:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._events: dict[str, list] = defaultdict(list)
        self._cpu_ms: dict[str, list[float]] = defaultdict(list)

    @contextmanager
    def section(self, name: str, device: torch.device | None = None):
        if not self.enabled:
            yield
            return
        if device is not None and device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events[name].append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._cpu_ms[name].append((time.perf_counter() - t0) * 1e3)

    def summary(self) -> dict[str, dict[str, float]]:
        """{section: {"total_ms", "calls", "mean_ms"}} (synchronises CUDA once)."""
        if self._events:
            torch.cuda.synchronize()
        out: dict[str, dict[str, float]] = {}
        names = set(self._events) | set(self._cpu_ms)
        for name in sorted(names):
            ms = [s.elapsed_time(e) for s, e in self._events.get(name, [])] + self._cpu_ms.get(name, [])
            out[name] = {"total_ms": float(sum(ms)), "calls": len(ms), "mean_ms": float(sum(ms) / len(ms))}
        return out

    def reset(self) -> None:
        self._events.clear()
        self._cpu_ms.clear()
