"""Compensation of skipped key clusters: approximate what sparse attention drops instead of dropping it.

A sparse call computes, for each query row x, exact attention over the keys of the key clusters (or blocks) it
selects. With compensation every *skipped* non-empty key cluster j still contributes as if its n_j keys all sat
at the cluster's centroid c_j with the cluster's mean value v̄_j (SVG-EAR's parameter-free "linear
compensation", arXiv 2603.08982):

    out(x) = (Σ_{y selected} e^{s_xy} v_y + Σ_{j skipped} n_j e^{q_x·c_j·scale} v̄_j)
             / (Σ_{y selected} e^{s_xy} + Σ_{j skipped} n_j e^{q_x·c_j·scale})

It is computed as two normalised attentions merged through their log-sum-exps (natural log):

* the sparse kernel's output and LSE over the selected keys: every attention kernel returns its LSE
  (``AttentionPlan.run(..., return_lse=True)``), so ``svg2_attention`` asks for it when compensating and
  records the kernel as the call's ``lse`` source;
* *centroid attention* (:func:`centroid_attention`): q against the key centroids with a ``log n_j`` bias, only
  over the clusters its query cluster skips (empty clusters weigh 0), with its own output and LSE;
* :func:`merge_attention` combines the two (:func:`compensate` runs both on a sparse result).

The centroids must be those of the current keys and the means those of the current values: the caller passes
k-means' last update (the means of exactly the returned clusters) or lets :func:`summarize_key_clusters`
take segment means over the permuted, contiguous clusters.

Centroid attention backends (recorded as ``compensation``), in ``auto``'s order of preference:

* ``triton`` (:mod:`svg2_kernels.compensation`, CUDA; CPU only under the Triton interpreter): one fused kernel
  that walks all key centroids per tile of query rows with an online softmax and merges with the sparse
  output and LSE in its epilogue, so :func:`compensate` needs no separate merge pass;
* ``triton_sorted`` (:mod:`svg2_kernels.compensation_sorted`, same platforms and numbers): the same fusion with
  query tiles in cluster order (``q_perm``; one or two skip rows per tile instead of a per-row gather), only
  the centroid tiles a query tile skips something in, and descriptor (TMA) loads of the centroid tiles;
* ``flex`` (FlexAttention with a ``score_mod`` carrying the bias and the skip mask: one fused GPU kernel that
  never materialises the (Sq x Ck) scores; the merge runs in torch);
* ``torch`` (chunked fp32 matmuls, any device: the reference).

``auto`` takes the first that accepts the inputs (each answers with its reasons, in the manner of
``svg2_kernels.registry``); should a GPU backend fail at run time, auto warns, runs the next one and records
e.g. ``torch (flex failed)``. A backend named explicitly that refuses raises with its reasons.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

__all__ = [
    "KeySummary",
    "segment_ids",
    "segment_means",
    "summarize_key_clusters",
    "compensation_bias",
    "centroid_attention",
    "merge_attention",
    "compensate",
    "COMPENSATION_BACKENDS",
]

COMPENSATION_BACKENDS = ("auto", "triton", "triton_sorted", "flex", "torch")
# H200, Wan 14B 720p shapes, (300, 1000) clusters, density 0.25 (results/compensation/README.md): the step alone
# 5.52 ms (triton_sorted) vs 5.84 ms (triton) vs 103 ms (torch); the whole compensated call +7.4% vs +9.2%.
_AUTO_ORDER = ("triton_sorted", "triton", "flex", "torch")
_TRITON_BACKENDS = ("triton", "triton_sorted")  # registry kernels (svg2_kernels.registry), merge fused
# Elements of a (rows x keys) fp32 score block materialised at once by the torch paths: 256 MiB on the CPU,
# 1 GiB on a GPU (fewer, larger matmuls for the O(S^2) LSE fallback).
_CHUNK_ELEMS = 1 << 26


def _chunk_elems(device: torch.device) -> int:
    return _CHUNK_ELEMS * (4 if device.type == "cuda" else 1)


@dataclass(frozen=True)
class KeySummary:
    """What compensation knows of every key cluster of one call.

    centroids (B, H, Ck, D) float32: mean of the cluster's current keys.
    value_means (B, H, Ck, D) float32: mean of the cluster's current values (0 for empty clusters).
    sizes (B, H, Ck) int64: keys per cluster.
    """

    centroids: torch.Tensor
    value_means: torch.Tensor
    sizes: torch.Tensor

    def __post_init__(self) -> None:
        b, h, c = self.sizes.shape
        for name in ("centroids", "value_means"):
            t = getattr(self, name)
            if t.dim() != 4 or tuple(t.shape[:3]) != (b, h, c):
                raise ValueError(f"KeySummary.{name} has shape {tuple(t.shape)}, expected {(b, h, c)} + (headdim,)")


# ------------------------------------------------------------------------------------------- summaries


def segment_ids(offsets: torch.Tensor, length: int) -> torch.Tensor:
    """Cluster of every sorted row: offsets (N, C+1) exclusive prefix sums -> (N, length) int64 in [0, C];
    rows past offsets[:, -1] get C (no cluster)."""
    rows = torch.arange(length, device=offsets.device, dtype=offsets.dtype)
    return torch.searchsorted(offsets[:, 1:].contiguous(), rows.expand(offsets.shape[0], length).contiguous(),
                              right=True)


def segment_means(x_sorted: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Mean of every contiguous cluster of rows.

    Args:
        x_sorted: (B, H, S, D), rows sorted so that cluster c occupies rows offsets[c]:offsets[c+1] with
            offsets the exclusive prefix sums of ``sizes``; rows past the last cluster are ignored.
        sizes: (B, H, C) int.
    Returns:
        (B, H, C, D) float32; empty clusters get zeros. Summed in fp32 per cluster: on CUDA by the Triton
        segment reduction (:func:`svg2_kernels.compensation.segment_means_triton`), elsewhere by a
        ``scatter_add`` chunked over (batch x head) so the fp32 copy stays small.
    """
    if x_sorted.device.type == "cuda" and _triton_kernels() is not None:
        # One program per (head, cluster) reading its contiguous rows: no atomics, one pass over x.
        return _triton_kernels().segment_means_triton(x_sorted, sizes)
    b, h, s, d = x_sorted.shape
    c = sizes.shape[-1]
    n = b * h
    offsets = torch.nn.functional.pad(torch.cumsum(sizes.reshape(n, c).long(), -1), (1, 0))
    seg = segment_ids(offsets, s)
    x = x_sorted.reshape(n, s, d)
    sums = torch.zeros(n, c + 1, d, dtype=torch.float32, device=x.device)
    step = max(1, (_CHUNK_ELEMS * 2) // max(1, s * d))
    for i in range(0, n, step):
        j = min(n, i + step)
        sums[i:j].scatter_add_(1, seg[i:j, :, None].expand(j - i, s, d), x[i:j].float())
    means = sums[:, :c] / sizes.reshape(n, c, 1).clamp_min(1).float()
    return means.reshape(b, h, c, d)


def summarize_key_clusters(
    k_sorted: torch.Tensor,
    v_sorted: torch.Tensor,
    sizes: torch.Tensor,
    centroids: torch.Tensor | None = None,
) -> KeySummary:
    """Centroids and mean values of the key clusters of one call.

    Args:
        k_sorted, v_sorted: (B, H, S, D) keys / values in cluster order (contiguous clusters).
        sizes: (B, H, Ck) int keys per cluster.
        centroids: (B, H, Ck, D) the means of the current keys when already known (k-means' last update);
            None computes them from ``k_sorted``.
    """
    if centroids is None:
        centroids = segment_means(k_sorted, sizes)
    return KeySummary(centroids.float(), segment_means(v_sorted, sizes), sizes.long())


def compensation_bias(sizes: torch.Tensor, skipped: torch.Tensor) -> torch.Tensor:
    """(B, H, Cq, Ck) float32: ``log n_j`` where query cluster i skips non-empty key cluster j, else -inf.

    Args:
        sizes: (B, H, Ck) keys per cluster; skipped: (B, H, Cq, Ck) bool (typically ``~layout.block_map``).
    """
    log_n = torch.log(sizes.float())[:, :, None, :]  # log 0 = -inf: empty clusters weigh 0
    return torch.where(skipped, log_n, torch.full_like(log_n, float("-inf")))


# ---------------------------------------------------------------------------------- centroid attention


def _check_comp_inputs(q, summary: KeySummary, skipped, q_labels) -> None:
    b, h, sq, d = q.shape
    ck = summary.sizes.shape[-1]
    if tuple(summary.centroids.shape) != (b, h, ck, d):
        raise ValueError(f"key centroids have shape {tuple(summary.centroids.shape)}, expected {(b, h, ck, d)} "
                         f"for q of shape {tuple(q.shape)}")
    if skipped.dim() != 4 or tuple(skipped.shape[:2]) != (b, h) or skipped.shape[-1] != ck:
        raise ValueError(f"skipped must be (batch, heads, Cq, Ck) = {(b, h, 'Cq', ck)}, got {tuple(skipped.shape)}")
    if skipped.dtype != torch.bool:
        raise TypeError(f"skipped must be a bool tensor, got {skipped.dtype}")
    if tuple(q_labels.shape) != (b, h, sq):
        raise ValueError(f"q_labels must be (batch, heads, seqlen_q) = {(b, h, sq)}, got {tuple(q_labels.shape)}")


def _centroid_attention_torch(q, summary: KeySummary, bias, q_labels, scale):
    b, h, sq, d = q.shape
    cq, ck = bias.shape[-2:]
    n = b * h
    kc = summary.centroids.reshape(n, ck, d).float()
    vm = summary.value_means.reshape(n, ck, d).float()
    bias = bias.reshape(n, cq, ck)
    lab = q_labels.reshape(n, sq).long()
    qf = q.reshape(n, sq, d)
    out = torch.empty(n, sq, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(n, sq, dtype=torch.float32, device=q.device)
    rows = max(1, _chunk_elems(q.device) // max(1, n * ck))
    for r0 in range(0, sq, rows):
        r1 = min(sq, r0 + rows)
        # -- logits of every centroid, then the per-query-cluster bias: log n_j, or -inf where j is computed --
        logits = torch.matmul(qf[:, r0:r1].float(), kc.transpose(1, 2)).mul_(scale)
        logits += torch.gather(bias, 1, lab[:, r0:r1, None].expand(n, r1 - r0, ck))
        row_lse = torch.logsumexp(logits, dim=-1)
        safe = torch.where(torch.isfinite(row_lse), row_lse, torch.zeros_like(row_lse))
        p = torch.exp(logits - safe[..., None])  # rows that skip nothing: all zeros
        out[:, r0:r1] = torch.matmul(p, vm)
        lse[:, r0:r1] = row_lse
    return out.reshape(b, h, sq, d), lse.reshape(b, h, sq)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_unsupported(q: torch.Tensor) -> list[str]:
    reasons = []
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:  # pragma: no cover
        reasons.append("torch.nn.attention.flex_attention is unavailable (torch >= 2.5 needed)")
    if q.device.type != "cuda":
        reasons.append(f"device '{q.device.type}' is not cuda (compiled FlexAttention returns no LSE on the CPU)")
    d = q.shape[-1]
    if d & (d - 1) or d < 16:
        reasons.append(f"head dim {d} is not a power of two >= 16")
    return reasons


@functools.cache
def _triton_kernels():
    """:mod:`svg2_kernels.compensation` when Triton is importable, else None."""
    from svg2_kernels._triton import HAS_TRITON

    if not HAS_TRITON:
        return None
    import svg2_kernels.compensation as kc

    return kc


def _triton_unsupported(q: torch.Tensor, skipped: torch.Tensor, name: str = "triton") -> list[str]:
    """A Triton kernel's refusals, from its registry entry (device, dtype, head dim, Triton installed)."""
    from svg2_kernels._triton import TRITON_MISSING

    if _triton_kernels() is None:
        return [TRITON_MISSING]
    from svg2_kernels.registry import CompensationInputs, get_compensation_variant

    return get_compensation_variant(name).not_supported_reasons(CompensationInputs.of(q, skipped))


def _unsupported(backend: str, q: torch.Tensor, skipped: torch.Tensor) -> list[str]:
    if backend in _TRITON_BACKENDS:
        return _triton_unsupported(q, skipped, backend)
    if backend == "flex":
        return _flex_unsupported(q)
    return []


def _candidates(backend: str, q: torch.Tensor, skipped: torch.Tensor) -> list[str]:
    """Backends to try, in order: the named one (raising with its reasons if it refuses), or for ``auto``
    every backend of :data:`_AUTO_ORDER` that accepts the inputs (torch always does)."""
    if backend not in COMPENSATION_BACKENDS:
        raise ValueError(f"compensation backend {backend!r} is unknown; choose one of {COMPENSATION_BACKENDS}")
    if backend != "auto":
        reasons = _unsupported(backend, q, skipped)
        if reasons:
            raise NotImplementedError(f"{backend} compensation cannot run here: {'; '.join(reasons)}. "
                                      "Use backend='torch' or 'auto'.")
        return [backend]
    return [b for b in _AUTO_ORDER if not _unsupported(b, q, skipped)]


def _run_first(candidates: list[str], auto: bool, fns: dict):
    """Run the first candidate; under ``auto`` a GPU backend that raises is reported (RuntimeWarning) and the
    next one runs, recorded as e.g. ``"torch (flex failed)"``. -> (result, recorded backend name)."""
    failed: list[str] = []
    for name in candidates:
        try:
            res = fns[name]()
        except Exception as e:  # noqa: BLE001 - auto keeps a run going on the next backend, and says so
            if not auto or name == candidates[-1]:
                raise
            nxt = candidates[candidates.index(name) + 1]
            warnings.warn(f"{name} compensation failed ({type(e).__name__}: {e}); the {nxt} backend ran instead "
                          f"(recorded as compensation='{nxt} ({name} failed)')", RuntimeWarning, stacklevel=3)
            failed.append(name)
            continue
        return res, (name if not failed else f"{name} ({', '.join(failed)} failed)")
    raise AssertionError("no compensation backend to run")  # pragma: no cover - torch is always a candidate


def _centroid_attention_triton(q, summary: KeySummary, skipped, q_labels, scale, out=None, lse=None,
                               q_perm=None, name: str = "triton"):
    """A fused Triton kernel (``name``: its registry entry); with ``out`` / ``lse`` it returns the merged
    (compensated) result."""
    from svg2_kernels.registry import get_compensation_variant

    return get_compensation_variant(name).run(q, summary.centroids, summary.value_means, summary.sizes, skipped,
                                              q_labels, scale, out, lse, q_perm=q_perm)


def _centroid_attention_flex(q, summary: KeySummary, bias, q_labels, scale, compiled: bool = True):
    """FlexAttention over the centroids: score_mod adds the (query cluster, key cluster) bias. ``compiled=False``
    runs FlexAttention's unfused eager path (CPU tests of the score_mod)."""
    from torch.nn.attention import flex_attention as fa

    b, h, sq, d = q.shape
    ck = bias.shape[-1]
    pad = (-ck) % 128  # whole key tiles: padded centroids have bias -inf
    kc = torch.nn.functional.pad(summary.centroids, (0, 0, 0, pad)).to(q.dtype)
    vm = torch.nn.functional.pad(summary.value_means, (0, 0, 0, pad)).to(q.dtype)
    tab = torch.nn.functional.pad(bias, (0, pad), value=float("-inf")).contiguous()
    lab = q_labels.to(torch.int32).contiguous()

    def score_mod(score, bi, hi, qi, ki):
        return score + tab[bi, hi, lab[bi, hi, qi], ki]

    fn = _compiled_flex() if compiled else fa.flex_attention
    aux_request = getattr(fa, "AuxRequest", None)
    if aux_request is not None:
        out, aux = fn(q, kc, vm, score_mod=score_mod, scale=scale, return_aux=aux_request(lse=True))
        lse = aux.lse
    else:  # pragma: no cover  (torch < 2.9)
        out, lse = fn(q, kc, vm, score_mod=score_mod, scale=scale, return_lse=True)
    lse = lse.float()
    finite = torch.isfinite(lse)
    # Rows that skip nothing: define out = 0, lse = -inf whatever the backend returns for an all -inf row.
    out = torch.where(finite[..., None], out, torch.zeros_like(out))
    lse = torch.where(finite, lse, torch.full_like(lse, float("-inf")))
    return out, lse


def centroid_attention(
    q: torch.Tensor,
    summary: KeySummary,
    skipped: torch.Tensor,
    q_labels: torch.Tensor,
    scale: float,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Attention of every query over the centroids of the key clusters its query cluster skips.

    Each skipped non-empty key cluster j is one pseudo-key with logit ``q . c_j * scale + log n_j`` and value
    ``v̄_j``; computed key clusters and empty clusters are excluded.

    Args:
        q: (B, H, Sq, D) queries (any order; ``q_labels`` gives each row's query cluster).
        summary: KeySummary with centroids / value_means (B, H, Ck, D) and sizes (B, H, Ck).
        skipped: (B, H, Cq, Ck) bool: query cluster i does not compute key cluster j exactly.
        q_labels: (B, H, Sq) int: query cluster of every row of q.
        scale: softmax scale.
        backend: "auto" | "triton" | "triton_sorted" | "flex" | "torch".
    Returns:
        out (B, H, Sq, D) (float32 on torch, q's dtype on triton / triton_sorted / flex; zeros for rows that skip
        nothing), lse (B, H, Sq) float32 natural log (-inf for rows that skip nothing), and the backend that ran.
    """
    _check_comp_inputs(q, summary, skipped, q_labels)
    candidates = _candidates(backend, q, skipped)
    bias = functools.cache(lambda: compensation_bias(summary.sizes, skipped))  # the (Cq, Ck) table: flex, torch
    fns = {
        "triton": lambda: _centroid_attention_triton(q, summary, skipped, q_labels, scale),
        "triton_sorted": lambda: _centroid_attention_triton(q, summary, skipped, q_labels, scale,
                                                            name="triton_sorted"),
        "flex": lambda: _centroid_attention_flex(q, summary, bias(), q_labels, scale),
        "torch": lambda: _centroid_attention_torch(q, summary, bias(), q_labels, scale),
    }
    (out, lse), used = _run_first(candidates, backend == "auto", fns)
    return out, lse, used


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the union of two disjoint key sets, from each set's normalised output and LSE.

    Args:
        out_a, out_b: (..., S, D) outputs of attention over key sets A and B (each normalised over its set).
        lse_a, lse_b: (..., S) natural-log log-sum-exp of each set's scaled scores (-inf: empty set).
    Returns:
        out (..., S, D) float32 and lse (..., S) float32 of the union; rows where both sets are empty get
        out = 0 and lse = -inf. Where set B is empty the result is ``out_a`` exactly.
    """
    lse_a, lse_b = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w_a = torch.exp(lse_a - safe)[..., None]  # exp(-inf) = 0 for an empty set
    w_b = torch.exp(lse_b - safe)[..., None]
    return w_a * out_a.float() + w_b * out_b.float(), lse


def compensate(
    out: torch.Tensor,
    lse: torch.Tensor,
    q: torch.Tensor,
    summary: KeySummary,
    skipped: torch.Tensor,
    q_labels: torch.Tensor,
    scale: float,
    *,
    backend: str = "auto",
    q_perm: torch.Tensor | None = None,
    cluster_order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Add the skipped clusters' centroid terms to a sparse attention result (see the module docstring).

    Args:
        out: (B, H, Sq, D) sparse attention output over the selected keys.
        lse: (B, H, Sq) float32 natural-log LSE of the sparse scores (-inf for rows that attended nothing).
        q: (B, H, Sq, D) the same query rows, in the same order as ``out``.
        summary, skipped, q_labels, scale, backend: as :func:`centroid_attention`.
        q_perm: (B, H, Sq) optional cluster order of the rows (``layout.q_perm``): the triton kernels walk
            their query tiles in that order (tiles within one or two query clusters; same results, token-order
            outputs). Ignored by the other backends.
        cluster_order: (B, H, Sq) the rows sorted by query cluster (``layout.q_perm``) for ``triton_sorted``,
            which always walks in cluster order (``q_perm`` when this is None; without either it sorts
            ``q_labels`` itself, one more sort per call). Ignored by the other backends.
    Returns:
        out (B, H, Sq, D) in ``out``'s dtype, lse (B, H, Sq) float32 of the compensated softmax, backend name.
    """
    if tuple(out.shape) != tuple(q.shape) or tuple(lse.shape) != tuple(q.shape[:3]):
        raise ValueError(f"out {tuple(out.shape)} and lse {tuple(lse.shape)} must match q {tuple(q.shape)} "
                         "and its first three dims")
    _check_comp_inputs(q, summary, skipped, q_labels)
    candidates = _candidates(backend, q, skipped)

    def unfused(name: str):
        out_c, lse_c, _ = centroid_attention(q, summary, skipped, q_labels, scale, backend=name)
        merged, lse_m = merge_attention(out, lse, out_c, lse_c)
        return merged.to(out.dtype), lse_m

    fns = {
        # The fused kernel merges in its epilogue: one pass, the merged out written in out's dtype.
        "triton": lambda: _centroid_attention_triton(q, summary, skipped, q_labels, scale, out, lse, q_perm),
        "triton_sorted": lambda: _centroid_attention_triton(q, summary, skipped, q_labels, scale, out, lse,
                                                            cluster_order if cluster_order is not None else q_perm,
                                                            name="triton_sorted"),
        "flex": lambda: unfused("flex"),
        "torch": lambda: unfused("torch"),
    }
    (merged, lse_m), used = _run_first(candidates, backend == "auto", fns)
    return merged, lse_m, used
