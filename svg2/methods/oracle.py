"""Exact-score block selection: ``oracle_raster`` and ``oracle_kmeans`` (slow, for analysis only).

What it is: exact attention probabilities (softmax of q k^T * scale over the video keys, per query row) are
summed per (query block, key block) of a fixed partition, and SVG2's own selection runs on these exact masses
instead of centroid estimates: ``top_p`` per query block or, at a matched density, ``target_density`` (greedy
by exact mass per token pair, the blocks with the most attention mass per pair first).

What it is not: an upper bound. It maximises attention *recall* among masks made of its partition's blocks
(greedily: exact only when the blocks are of equal size), so
  * it bounds neither other partitions: a method with a better partition (SVG2's clusters for content heads,
    SVG1's temporal / spatial masks for positional heads) keeps more mass at the same density;
  * nor output error: recall counts kept probability, while the output error also depends on the values of
    the dropped keys and on the renormalisation over the kept ones (on the mini model at the long point,
    ``oracle_raster`` scores 22.3 / 25.7 dB PSNR at target density 0.15 / 0.3 where SVG1 scores 23.8 / 26.0).
The largest recall any mask of a given density can reach is the top-k bound of the recall analysis
(``svg2.attention_structure.recall_bound``: the k = density x pairs highest exact attention weights), which
``analysis.recall`` reports beside every method (its ``bound`` column, and the ``bound`` rows and curve).

Methods (one class each, so a config names only the parameters its partition takes):
  * ``oracle_raster``: contiguous raster blocks of ``block_size`` video tokens (the partition of
    ``positional``); ``block_size=1`` is token-level greedy selection;
  * ``oracle_kmeans``: SVG2's own k-means clusters (warm-started per call site like SVG2), i.e. what SVG2 would
    select if its centroid estimate of the block masses were exact;
  * ``oracle``: deprecated name of the above with a ``partition`` argument (``raster`` by default); it warns
    and otherwise runs unchanged, so stored results and sweeps naming it stay valid.
Cost: O(S^2) score work per call (chunked over query rows), plus O(B H Cq Ck) for the block masses.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from svg2.attention import build_layout
from svg2.config import SVG2Config
from svg2.layout import ClusterLayout
from svg2.methods.base import AttentionContext, check_target_density, register_method
from svg2.methods.blockwise import LayoutMethod, refuse_single_token_compensation, softmax_scale, static_layout
from svg2.selection import select_target_density, select_top_p

__all__ = ["ExactScoreSelection", "OracleRasterMethod", "OracleKMeansMethod", "OracleMethod", "exact_block_mass"]

_PARTITIONS = ("raster", "kmeans")
# Elements of one (heads, rows, keys) probability chunk: 2^26 fp32 = 256 MiB. The chunk is sized over rows and
# heads together, so a batched call (B x H in the hundreds) still takes hundreds of rows per matmul instead of a
# handful (the earlier rows-only sizing gave 5 rows per chunk at B x H = 512, S = 8,192: thousands of launches).
_CHUNK_ELEMS = 1 << 26


def _half_on_cuda(q: torch.Tensor, k: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype


def _fp32_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q @ k^T`` in float32, (g, r, D) x (g, Sk, D) -> (g, r, Sk). On CUDA with bf16/fp16 inputs the product runs
    on tensor cores with fp32 accumulation (``out_dtype``): products of half-precision values are exact in fp32, so
    this is the fp32 matmul of the upcast inputs up to summation order, without fp32's non-tensor-core rate."""
    if _half_on_cuda(q, k):
        return torch.bmm(q, k.transpose(1, 2), out_dtype=torch.float32)
    return torch.matmul(q.float(), k.float().transpose(1, 2))


def _reduce_query_blocks(acc: torch.Tensor, onehot_q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``acc + onehot_q^T p`` in float32. On CUDA, ``p`` is split into fp16 high and low parts (one-hot values
    are exact in fp16), two tensor-core matmuls with fp32 accumulation: about 2^-21 relative error per
    probability instead of fp32's 2^-24, at the tensor cores' rate."""
    if not p.is_cuda:
        return acc.baddbmm_(onehot_q.transpose(1, 2), p)
    hi = p.to(torch.float16)
    lo = (p - hi.float()).to(torch.float16)
    oh = onehot_q.transpose(1, 2).to(torch.float16)
    acc += torch.bmm(oh, hi, out_dtype=torch.float32)
    return acc.add_(torch.bmm(oh, lo, out_dtype=torch.float32))


def exact_block_mass(q: torch.Tensor, k: torch.Tensor, q_labels: torch.Tensor, k_labels: torch.Tensor,
                     num_q_blocks: int, num_k_blocks: int, scale: float) -> torch.Tensor:
    """Sum of exact attention probabilities (softmax over the given keys) per (query block, key block).

    ``mass = Mq^T P Mk`` with ``P`` the float32 softmax and ``Mq``, ``Mk`` the one-hot block memberships: the
    query side is reduced first, chunk by chunk, into a (Cq, Sk) accumulator by a matmul (no scatter atomics over
    the S x S probabilities), and the key side once at the end. One-hot products are exact, so this is the same
    sum as a scatter up to float32 summation order (on CUDA with half-precision q / k: scores from tensor-core
    matmuls with fp32 accumulation, exact products; the query reduction on fp16 high/low parts of P).

    Args:
        q: (N, Sq, D); k: (N, Sk, D); q_labels: (N, Sq), k_labels: (N, Sk) int64 block ids.
    Returns:
        (N, Cq, Ck) float32; row i sums to the number of tokens in query block i.
    """
    n, sq, _ = q.shape
    sk = k.shape[1]
    mass = torch.empty(n, num_q_blocks, num_k_blocks, dtype=torch.float32, device=q.device)
    # Heads per group: the (g, Cq, Sk) accumulator and the (g, Sk, Ck) key one-hot stay within one chunk.
    heads = max(1, min(n, _CHUNK_ELEMS // max(1, sk * max(num_q_blocks, num_k_blocks))))
    for h0 in range(0, n, heads):
        h1 = min(n, h0 + heads)
        g = h1 - h0
        kh = k[h0:h1] if _half_on_cuda(q, k) else k[h0:h1].float()  # upcast once per head group, not per chunk
        ql = q_labels[h0:h1]
        acc = torch.zeros(g, num_q_blocks, sk, dtype=torch.float32, device=q.device)
        rows = max(1, _CHUNK_ELEMS // (g * sk))
        for s0 in range(0, sq, rows):
            s1 = min(sq, s0 + rows)
            p = torch.softmax(_fp32_scores(q[h0:h1, s0:s1], kh).mul_(scale), dim=-1)
            onehot_q = torch.nn.functional.one_hot(ql[:, s0:s1], num_q_blocks).to(torch.float32)  # (g, r, Cq)
            acc = _reduce_query_blocks(acc, onehot_q, p)
        onehot_k = torch.nn.functional.one_hot(k_labels[h0:h1], num_k_blocks).to(torch.float32)  # (g, Sk, Ck)
        torch.bmm(acc, onehot_k, out=mass[h0:h1])
    return mass


class ExactScoreSelection(LayoutMethod):
    """Shared machinery: exact block masses over a partition, then SVG2's selection on them.

    Subclasses call ``_setup`` from their constructor (this class has none of its own, so each registered
    method's parameters are exactly its constructor's)."""

    partition: str
    block_size: int
    top_p: float
    target_density: float | None
    min_kc_ratio: float
    kmeans_cfg: SVG2Config | None

    def _setup(self, partition: str, *, block_size: int, top_p: float, target_density: float | None,
               min_kc_ratio: float, kmeans_cfg: SVG2Config | None) -> None:
        if partition not in _PARTITIONS:
            raise ValueError(f"partition={partition!r} must be one of {_PARTITIONS}")
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1")
        if partition == "raster":
            refuse_single_token_compensation(self.name, block_size, self.compensate)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p} must be in (0, 1]")
        check_target_density(target_density)
        self.partition = partition
        self.block_size = int(block_size)
        self.top_p = float(top_p)
        self.target_density = target_density
        self.min_kc_ratio = float(min_kc_ratio)
        # Clustering settings of the kmeans partition (selection settings are this method's own).
        self.kmeans_cfg = kmeans_cfg if partition == "kmeans" else None

    def _labels(self, q, k, ctx) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        b, h, s, _ = q.shape
        sv = s - ctx.num_text_tokens
        if self.partition == "raster":
            lab = (torch.arange(sv, device=q.device) // self.block_size).expand(b * h, sv)
            c = -(-sv // self.block_size)
            return lab, lab, c, c
        # One warm-start state per method name and call site (the deprecated name keeps its old key).
        state = ctx.state.cluster_state(self.name, *ctx.site())
        lay = build_layout(q, k, self.kmeans_cfg, state, num_text_tokens=ctx.num_text_tokens,
                           text_mask=ctx.text_mask, scale=ctx.scale, heads=ctx.heads)
        return (lay.q_labels.reshape(b * h, sv), lay.k_labels.reshape(b * h, sv), lay.num_q_clusters,
                lay.num_k_clusters)

    def layout(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> ClusterLayout:
        b, h, s, d = q.shape
        sv = s - ctx.num_text_tokens
        n = b * h
        lq, lk, cq, ck = self._labels(q, k, ctx)
        mass = exact_block_mass(q[:, :, :sv].reshape(n, sv, d), k[:, :, :sv].reshape(n, sv, d), lq, lk, cq, ck,
                                softmax_scale(q, ctx.scale))
        q_sizes = torch.zeros(n, cq, dtype=torch.long, device=q.device).scatter_add_(1, lq, torch.ones_like(lq))
        k_sizes = torch.zeros(n, ck, dtype=torch.long, device=q.device).scatter_add_(1, lk, torch.ones_like(lk))
        scores = mass / q_sizes.clamp_min(1)[..., None].float()  # mean row mass: rows sum to 1
        if self.target_density is not None:
            block_map = select_target_density(scores, q_sizes, k_sizes, self.target_density, self.min_kc_ratio)
        else:
            block_map = select_top_p(scores, self.top_p, self.min_kc_ratio)
        return static_layout(lq.reshape(b, h, sv), lk.reshape(b, h, sv), block_map.view(b, h, cq, ck), b, h,
                             num_text_tokens=ctx.num_text_tokens, text_mask=ctx.text_mask)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "partition": self.partition,
                **({"block_size": self.block_size} if self.partition == "raster" or self.name == "oracle" else {}),
                "top_p": self.top_p, "target_density": self.target_density, "min_kc_ratio": self.min_kc_ratio,
                **({"kmeans": self.kmeans_cfg.to_dict()} if self.kmeans_cfg is not None else {})}


@register_method("oracle_raster")
class OracleRasterMethod(ExactScoreSelection):
    """Recall-greedy exact-score selection over raster blocks of ``block_size`` video tokens (not an upper
    bound: see the module docstring)."""

    def __init__(self, block_size: int = 64, top_p: float = 0.9, target_density: float | None = None,
                 min_kc_ratio: float = 0.0, **schedule: Any) -> None:
        super().__init__(**schedule)
        self._setup("raster", block_size=block_size, top_p=top_p, target_density=target_density,
                    min_kc_ratio=min_kc_ratio, kmeans_cfg=None)


@register_method("oracle_kmeans")
class OracleKMeansMethod(ExactScoreSelection):
    """Recall-greedy exact-score selection over SVG2's k-means clusters (what SVG2 would select with exact
    block masses; not an upper bound: see the module docstring)."""

    # The clustering follows the model preset's SVG2 settings, so in a harness sweep it is SVG2's partition.
    shared_knobs = LayoutMethod.shared_knobs + ("num_q_centroids", "num_k_centroids", "kmeans_iters_init",
                                                "kmeans_iters_step", "seed")

    def __init__(self, top_p: float = 0.9, target_density: float | None = None, min_kc_ratio: float = 0.0,
                 num_q_centroids: int = 100, num_k_centroids: int = 500, kmeans_iters_init: int = 50,
                 kmeans_iters_step: int = 2, seed: int = 0, **schedule: Any) -> None:
        super().__init__(**schedule)
        cfg = SVG2Config(num_q_centroids=num_q_centroids, num_k_centroids=num_k_centroids,
                         kmeans_iters_init=kmeans_iters_init, kmeans_iters_step=kmeans_iters_step, seed=seed)
        self._setup("kmeans", block_size=1, top_p=top_p, target_density=target_density,
                    min_kc_ratio=min_kc_ratio, kmeans_cfg=cfg)


@register_method("oracle")
class OracleMethod(ExactScoreSelection):
    """Deprecated name: ``partition="raster"`` is ``oracle_raster``, ``partition="kmeans"`` is ``oracle_kmeans``
    (same selection, same results). Warns once per call site of the constructor."""

    def __init__(self, partition: str = "raster", block_size: int = 64, top_p: float = 0.9,
                 target_density: float | None = None, min_kc_ratio: float = 0.0,
                 num_q_centroids: int = 100, num_k_centroids: int = 500, kmeans_iters_init: int = 50,
                 kmeans_iters_step: int = 2, seed: int = 0, **schedule: Any) -> None:
        new = {"raster": "oracle_raster", "kmeans": "oracle_kmeans"}.get(partition, "oracle_raster")
        warnings.warn(f"attention method 'oracle' is deprecated and is not an upper bound: it is recall-greedy "
                      f"exact-score block selection over the {partition!r} partition. Use method {new!r} (same "
                      "results); the recall bound of a density is the 'bound' of the recall analysis",
                      FutureWarning, stacklevel=2)
        super().__init__(**schedule)
        cfg = SVG2Config(num_q_centroids=num_q_centroids, num_k_centroids=num_k_centroids,
                         kmeans_iters_init=kmeans_iters_init, kmeans_iters_step=kmeans_iters_step, seed=seed)
        self._setup(partition, block_size=block_size, top_p=top_p, target_density=target_density,
                    min_kc_ratio=min_kc_ratio, kmeans_cfg=cfg)
