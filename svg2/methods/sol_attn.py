"""A Sol-Attn-style baseline: positional blocks chosen by a threshold on block-mean scores, with every skipped block
compensated by its mean key and mean value.

NVlabs' Sol-Attn (in SGLang, LightX2V and TensorRT-LLM) stands summary K/V in for the unselected 64-token blocks.
This is a baseline in that spirit, written from that one-line description (issue 17), not from Sol-Attn's code,
which could not be read here: its exact selection rule and defaults are not verified.

* Blocks: ``block_size`` (64) consecutive raster-order video tokens, as ``positional``.
* Estimate: SVG2's centroid score on the mean-pooled Q and K of the blocks, ``P_ij`` (size-weighted softmax; rows
  sum to 1).
* Selection: query block i computes key block j exactly when ``P_ij * Ck >= threshold``, i.e. when the block's
  estimated share is at least ``threshold`` times the uniform share (1.0: the above-average blocks), and never
  fewer than ceil(min_kc_ratio * Ck) blocks, at least one (the best). ``target_density`` replaces the threshold with
  SVG2's matched-density selection.
* Every skipped block is compensated (``svg2.compensation``) with the mean key and mean value of its current
  tokens: always on, that is what separates it from ``positional`` (whose ``compensate`` option, with top-p instead
  of a threshold, is the other half of the positional-vs-clusters x drop-vs-compensate ablation).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from svg2.methods.base import register_method
from svg2.methods.positional import RasterBlockSelection
from svg2.selection import min_key_clusters

__all__ = ["SolAttnMethod", "select_threshold"]


def select_threshold(scores: torch.Tensor, k_sizes: torch.Tensor, threshold: float, min_kc_ratio: float
                     ) -> torch.Tensor:
    """Keep pair (i, j) when ``scores[i, j] * (non-empty key blocks) >= threshold``, and at least the
    ``min_key_clusters(min_kc_ratio, Ck)`` best blocks of every row.

    Args:
        scores: (N, Cq, Ck) row-stochastic estimates; k_sizes: (N, Ck) tokens per key block.
    Returns:
        block_map (N, Cq, Ck) bool.
    """
    ck = scores.shape[-1]
    live = (k_sizes > 0).sum(-1).clamp_min(1).to(scores.dtype)  # (N,): the uniform share is 1 / live
    keep = scores * live[:, None, None] >= threshold
    m = min_key_clusters(min_kc_ratio, ck)
    top = scores.topk(min(m, ck), dim=-1).indices
    return keep.scatter_(-1, top, True)


@register_method("sol_attn")
class SolAttnMethod(RasterBlockSelection):
    """Raster blocks, threshold on block-mean scores, compensation of every skipped block (always on)."""

    @classmethod
    def parameters(cls) -> frozenset[str]:
        return super().parameters() - {"compensate"}  # always on (the method); only compensate=True is accepted

    def __init__(self, block_size: int = 64, threshold: float = 1.0, min_kc_ratio: float = 0.0,
                 target_density: float | None = None, **schedule: Any) -> None:
        if schedule.pop("compensate", True) is not True:
            raise ValueError("sol_attn always compensates its skipped blocks (that is the method); for dropping them "
                             "use method=positional, whose compensate option is off by default")
        super().__init__(compensate=True, **schedule)
        if not (math.isfinite(threshold) and threshold >= 0):
            raise ValueError(f"threshold={threshold} must be a finite number >= 0 (in units of the uniform share)")
        if not 0.0 <= min_kc_ratio <= 1.0:
            raise ValueError(f"min_kc_ratio={min_kc_ratio} must be in [0, 1]")
        self._setup_blocks(block_size, min_kc_ratio, target_density)
        self.threshold = float(threshold)

    def select(self, scores: torch.Tensor, q_sizes: torch.Tensor, k_sizes: torch.Tensor) -> torch.Tensor:
        return select_threshold(scores, k_sizes, self.threshold, self.min_kc_ratio)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "block_size": self.block_size, "threshold": self.threshold,
                "min_kc_ratio": self.min_kc_ratio, "target_density": self.target_density}
