"""The kernel plan of one sparse layout (in the spirit of FlexAttention's ``BlockMask``).

:func:`build_plan` picks the attention kernel once (``"auto"``: the fastest that accepts the inputs; every
faster one that refused is kept in ``plan.skipped`` with its reason) and builds, on the layout's device and
without host syncs, everything that kernel needs besides Q, K and V: for the Triton kernels the key tile
table and the query-tile schedule, for ``flex`` the ``BlockMask``. A plan is reused across calls that share
a layout (the static masks of the baselines build theirs once); :meth:`AttentionPlan.run` launches it.

:class:`TileConfig` is the public tile configuration of the Triton kernels (``SVG2Config.attention_tiles``,
``kernel.tiles`` in the harness). Its fields default to None, which means *the measured default of the
kernel that runs, for the inputs' shape* (:meth:`TileConfig.resolve`); a field that is set overrides it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from svg2_kernels._triton import interpreting

if TYPE_CHECKING:
    from svg2_kernels.registry import AttentionInputs, AttentionVariant

__all__ = ["TileConfig", "AttentionPlan", "build_plan"]


@dataclass(frozen=True)
class TileConfig:
    """Tiles and launch parameters of the Triton attention kernels; None = the measured default.

    Fields:
        block_m: query rows per program (query clusters are cut into tiles of this many rows).
        block_n: key rows per tile (``triton_tma``: one TMA box of one run, 16..128).
        num_warps, num_stages: launch of the ``block_m`` tier.
        block_m_small: >0: remainders of at most this many rows run as a second launch with this tile.
        num_warps_small: warps of that second launch.
        chunk: rows per chunk of a key tile (``triton_chunks`` only; a power of two dividing block_n).
        lpt: longest work items first inside each head (heads stay in order for L2 reuse of K/V).
        lpt_global: longest first over all heads instead.
        triton_schedule: build the query-tile schedule in two Triton launches instead of ~50 torch ops.

    Measured defaults (one H200, bf16, Wan 1.3B / 14B shapes; notes/kernels.md):
        ``triton_tma``, head dim <= 128: 128 x 64 tiles, 4 warps (two programs per SM hide each other's
        softmax), 2 stages, a 64-row second tier, lpt; lpt_global only for sequences <= 49152 keys (it won at
        Wan 1.3B, S=32760: 4.43 -> 4.04 ms, and lost at Wan 14B, S=75600: 60.8 -> 62.2 ms).
        ``triton_chunks``: 128 x 128 tiles, 8 warps, 3 stages, 64-row second tier, 16-row chunks; for head
        dims > 128, 64 x 64 tiles and 4 warps (128 x 128 tiles of D=256 exceed shared memory).
        Under Triton's CPU interpreter: 16 x 16 tiles (the tests).
        The Triton schedule: the metadata of a Wan 1.3B call fell from 2.23 to 0.74 ms eager.
    """

    block_m: int | None = None
    block_n: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    block_m_small: int | None = None
    num_warps_small: int | None = None
    chunk: int | None = None
    lpt: bool | None = None
    lpt_global: bool | None = None
    triton_schedule: bool | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if f.name in ("lpt", "lpt_global", "triton_schedule"):
                if not isinstance(v, bool):
                    raise TypeError(f"TileConfig.{f.name} must be a bool or None, got {v!r}")
            elif isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise TypeError(f"TileConfig.{f.name} must be a non-negative int or None, got {v!r}")
        for name in ("block_m", "block_n", "block_m_small", "chunk", "num_warps", "num_warps_small"):
            v = getattr(self, name)
            if v and v & (v - 1):
                raise ValueError(f"TileConfig.{name} must be a power of two, got {v}")
        if self.block_m is not None and self.block_m < 16 or self.block_n is not None and self.block_n < 16:
            raise ValueError(f"TileConfig.block_m and block_n must be >= 16 (tl.dot), got {self.block_m}, "
                             f"{self.block_n}")
        if self.block_n and self.chunk and (self.block_n % self.chunk or self.chunk > 128):
            raise ValueError(f"TileConfig.chunk ({self.chunk}) must be a power of two <= 128 dividing block_n "
                             f"({self.block_n})")

    @classmethod
    def coerce(cls, value: TileConfig | dict[str, Any] | None) -> TileConfig:
        """A TileConfig from a TileConfig, a mapping of some of its fields (e.g. a Hydra node) or None."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise KeyError(f"unknown TileConfig field(s) {sorted(unknown)}; known: "
                           f"{[f.name for f in dataclasses.fields(cls)]}")
        return cls(**{k: v for k, v in dict(value).items() if v is not None})

    def overrides(self) -> dict[str, Any]:
        """The fields that are set (not None)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def resolve(self, kernel: str, inputs: AttentionInputs) -> TileConfig:
        """Every field set: the measured default of ``kernel`` for ``inputs``, overridden by the set fields."""
        if interpreting() or inputs.device_type != "cuda":
            base = TileConfig(16, 16, 4, 1, 0, 4, 16, False, False, True)
        elif kernel == "triton_tma":
            base = TileConfig(128, 64, 4, 2, 64, 4, 64, True, inputs.seqlen_k <= 49152, True)
        elif inputs.head_dim > 128:
            base = TileConfig(64, 64, 4, 2, 0, 4, 16, False, False, True)
        else:
            base = TileConfig(128, 128, 8, 3, 64, 4, 16, False, False, True)
        out = dataclasses.replace(base, **self.overrides())
        if kernel == "triton_tma":  # one box per tile: the chunk table is cut at block_n
            if not 16 <= out.block_n <= 128:
                raise ValueError(f"kernel 'triton_tma' needs 16 <= block_n <= 128 (one TMA box per tile), "
                                 f"got {out.block_n}")
            out = dataclasses.replace(out, chunk=out.block_n)
        if out.block_n % out.chunk or out.chunk > 128:
            raise ValueError(f"TileConfig.chunk ({out.chunk}) must divide block_n ({out.block_n}) and be <= 128")
        if out.block_m_small and out.block_m_small >= out.block_m:
            raise ValueError(f"TileConfig.block_m_small ({out.block_m_small}) must be < block_m ({out.block_m})")
        return out

    def as_list(self) -> list[int]:
        """The launch fields as ints (the custom op's ``tiles`` argument); the plan is already built."""
        return [self.block_m, self.block_n, self.num_warps, self.num_stages, self.block_m_small,
                self.num_warps_small, self.chunk]


@dataclass(frozen=True, eq=False)
class AttentionPlan:
    """A sparse layout made ready for one attention kernel. Build with :func:`build_plan` (or
    ``ClusterLayout.plan``); reuse across calls with the same layout; run with :meth:`run`.

    kernel: the kernel that runs (a concrete name, never "auto"); skipped: faster kernels that refused the
    inputs, as ``"name: reason"``; tiles: the resolved tile config (Triton kernels) or None.
    q_offsets (B, H, Cq + 1), k_offsets (B, H, Ck + 1) int, block_map (B, H, Cq, Ck) bool: the layout.
    seqlen_q, seqlen_k: rows of the cluster-sorted Q and K/V the plan was built for.
    data: the kernel's own prepared metadata (Triton: ``VarBlockMetadata``; flex: a ``BlockMask``; torch: None).
    """

    variant: AttentionVariant
    inputs: AttentionInputs
    q_offsets: torch.Tensor
    k_offsets: torch.Tensor
    block_map: torch.Tensor
    tiles: TileConfig | None = None
    data: Any = None
    skipped: tuple[str, ...] = ()

    @property
    def kernel(self) -> str:
        return self.variant.name

    @property
    def seqlen_q(self) -> int:
        return self.inputs.seqlen_q

    @property
    def seqlen_k(self) -> int:
        return self.inputs.seqlen_k

    def run(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float | None = None,
        q_perm: torch.Tensor | None = None,
        return_lse: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Variable-block attention on this plan.

        Args:
            q: (B, H, Sq, D), rows sorted by query cluster, or in token order when ``q_perm`` is given.
            k, v: (B, H, Sk, D), rows sorted by key cluster.
            scale: softmax scale, default 1/sqrt(D).
            q_perm: (B, H, Sq) int, sorted position -> token index: q and the outputs are in token order.
            return_lse: also return the log-sum-exp of the scaled scores.
        Returns:
            out (B, H, Sq, D) in q's dtype (rows without keys are zero); with ``return_lse``, ``(out, lse)``
            with lse (B, H, Sq) float32, natural log, -inf for rows without keys, in the order of ``out``.
        """
        self._check(q, k, v, q_perm)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        variant = self.variant
        if q_perm is not None and not variant.fuses_query_permutation:
            qs = variant.gather_rows(q, q_perm)
            out_s, lse_s = variant.run(qs, k, v, self, scale, None, return_lse)
            idx = q_perm.unsqueeze(-1).expand_as(out_s)
            out = torch.empty_like(out_s).scatter_(2, idx, out_s)
            lse = None if lse_s is None else torch.empty_like(lse_s).scatter_(2, q_perm, lse_s)
        else:
            out, lse = variant.run(q, k, v, self, scale, q_perm, return_lse)
        return (out, lse) if return_lse else out

    def _check(self, q, k, v, q_perm) -> None:
        b, h = self.block_map.shape[:2]
        if q.dim() != 4 or k.shape != v.shape or tuple(q.shape[:2]) != (b, h) or tuple(k.shape[:2]) != (b, h):
            raise ValueError(f"expected q (B,H,Sq,D) and k, v (B,H,Sk,D) with (B, H) = {(b, h)} of the plan; got "
                             f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
        if q.shape[-1] != k.shape[-1]:
            raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
        if (q.shape[2], k.shape[2]) != (self.seqlen_q, self.seqlen_k):
            raise ValueError(f"this plan was built for seqlen_q={self.seqlen_q}, seqlen_k={self.seqlen_k}; got "
                             f"{q.shape[2]} and {k.shape[2]}: build a plan for these lengths")
        if (q.device.type, q.dtype, q.shape[-1]) != (self.inputs.device_type, self.inputs.dtype, self.inputs.head_dim):
            raise ValueError(f"this plan was built for {self.inputs.device_type} {self.inputs.dtype} head dim "
                             f"{self.inputs.head_dim}; got {q.device.type} {q.dtype} head dim {q.shape[-1]}: "
                             "build a plan for these inputs (the kernel choice depends on them)")
        if q_perm is not None and tuple(q_perm.shape) != tuple(q.shape[:3]):
            raise ValueError(f"q_perm must be (B, H, Sq) = {tuple(q.shape[:3])}, got {tuple(q_perm.shape)}")

    def __repr__(self) -> str:
        b, h, cq, ck = self.block_map.shape
        skipped = f", skipped={list(self.skipped)}" if self.skipped else ""
        tiles = "" if self.tiles is None else f", tiles={self.tiles.as_list()}"
        return (f"AttentionPlan(kernel={self.kernel!r}, batch={b}, heads={h}, q_clusters={cq}, k_clusters={ck}, "
                f"seqlen_q={self.seqlen_q}, seqlen_k={self.seqlen_k}{tiles}{skipped})")


def build_plan(
    q_offsets: torch.Tensor,
    k_offsets: torch.Tensor,
    block_map: torch.Tensor,
    seqlen_q: int,
    seqlen_k: int,
    *,
    head_dim: int,
    dtype: torch.dtype,
    kernel: str = "auto",
    tiles: TileConfig | dict[str, Any] | None = None,
) -> AttentionPlan:
    """Pick the kernel once and build its metadata (on ``block_map``'s device, no host sync).

    Args:
        q_offsets: (B, H, Cq + 1) int, exclusive prefix sums of the query cluster sizes (sorted order).
        k_offsets: (B, H, Ck + 1) int; key rows past ``k_offsets[..., -1]`` are never attended.
        block_map: (B, H, Cq, Ck) bool: query cluster i attends to key cluster j.
        seqlen_q, seqlen_k: rows of the Q and K/V the plan will run on.
        head_dim, dtype: of Q/K/V (the kernel choice depends on them).
        kernel: a kernel name (``svg2_kernels.available_attention_variants()``) or "auto".
        tiles: tile overrides for the Triton kernels (TileConfig or a mapping of its fields).
    """
    from svg2_kernels.registry import AttentionInputs, select_attention_variant

    _check_layout(q_offsets, k_offsets, block_map)
    inputs = AttentionInputs(block_map.device.type, dtype, int(head_dim), int(seqlen_q), int(seqlen_k))
    variant, skipped = select_attention_variant(kernel, inputs, with_skipped=True)
    user_tiles = TileConfig.coerce(tiles)
    return variant.plan(q_offsets, k_offsets, block_map, inputs, user_tiles, tuple(skipped))


def _check_layout(q_offsets, k_offsets, block_map) -> None:
    if block_map.dim() != 4 or block_map.dtype != torch.bool:
        raise ValueError(f"block_map must be a (B, H, Cq, Ck) bool tensor, got {block_map.dtype} "
                         f"{tuple(block_map.shape)}")
    b, h, cq, ck = block_map.shape
    if tuple(q_offsets.shape) != (b, h, cq + 1) or tuple(k_offsets.shape) != (b, h, ck + 1):
        raise ValueError(f"q_offsets must be (B,H,Cq+1) = {(b, h, cq + 1)} and k_offsets (B,H,Ck+1) = "
                         f"{(b, h, ck + 1)}; got {tuple(q_offsets.shape)} and {tuple(k_offsets.shape)}")
    if not (q_offsets.device == k_offsets.device == block_map.device):
        raise ValueError("q_offsets, k_offsets and block_map must be on one device")
