"""ClusterLayout: the sparse layout of one SVG2 attention call (steps 3-4 of SVG2).

Like FlexAttention's ``BlockMask``: a small value that owns the layout, can be printed, inspected, moved and
tested against (``to_dense()``), and validates its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from svg2_kernels.plan import AttentionPlan, TileConfig, build_plan

__all__ = ["ClusterLayout"]


def _exclusive_cumsum(sizes: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(torch.cumsum(sizes, dim=-1), (1, 0))


@dataclass(frozen=True)
class ClusterLayout:
    """Clusters of queries and keys, the selected cluster pairs, and the permutations that make every
    cluster one contiguous segment.

    Shapes (B batch, H heads, Sq/Sk clustered tokens, Cq/Ck clusters):
        q_labels (B, H, Sq) int64, k_labels (B, H, Sk) int64: cluster of every token, in token order.
        q_sizes (B, H, Cq) int64, k_sizes (B, H, Ck) int64: tokens per cluster (0 for empty clusters).
        q_perm (B, H, Sq) int64, k_perm (B, H, Sk) int64: sorted position -> token index (stable sort by
            label), so ``x.gather(2, perm)`` puts every cluster into one contiguous segment.
        block_map (B, H, Cq, Ck) bool: query cluster i attends to key cluster j.
        num_text_tokens: trailing joint-text tokens after the clustered video tokens (not clustered:
            attended densely in both directions, see ``to_dense``).
        text_mask (B, num_text_tokens) bool or None: which text keys are real (padding is masked).
    """

    q_labels: torch.Tensor
    k_labels: torch.Tensor
    q_sizes: torch.Tensor
    k_sizes: torch.Tensor
    q_perm: torch.Tensor
    k_perm: torch.Tensor
    block_map: torch.Tensor
    num_text_tokens: int = 0
    text_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        b, h, cq, ck = self.block_map.shape
        expect = {
            "q_labels": (b, h, self.q_labels.shape[-1]),
            "k_labels": (b, h, self.k_labels.shape[-1]),
            "q_sizes": (b, h, cq),
            "k_sizes": (b, h, ck),
            "q_perm": tuple(self.q_labels.shape),
            "k_perm": tuple(self.k_labels.shape),
        }
        for name, shape in expect.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"ClusterLayout.{name} has shape {got}, expected {shape} "
                                 f"(block_map is {(b, h, cq, ck)})")
        if self.block_map.dtype != torch.bool:
            raise TypeError(f"ClusterLayout.block_map must be bool, got {self.block_map.dtype}")
        if self.text_mask is not None and tuple(self.text_mask.shape) != (b, self.num_text_tokens):
            raise ValueError(f"text_mask has shape {tuple(self.text_mask.shape)}, "
                             f"expected {(b, self.num_text_tokens)}")

    # ----------------------------------------------------------------------------------- construction
    @classmethod
    def from_labels(
        cls,
        q_labels: torch.Tensor,
        k_labels: torch.Tensor,
        block_map: torch.Tensor,
        *,
        q_sizes: torch.Tensor | None = None,
        k_sizes: torch.Tensor | None = None,
        num_text_tokens: int = 0,
        text_mask: torch.Tensor | None = None,
        q_perm: torch.Tensor | None = None,
        k_perm: torch.Tensor | None = None,
    ) -> ClusterLayout:
        """Build from per-token labels (B, H, S) and a block map (B, H, Cq, Ck).

        ``q_perm``/``k_perm`` may be given when already known (they must equal the stable argsort of the
        labels, as the Triton k-means' counting sort produces); otherwise they are computed here."""
        if q_labels.dim() != 3 or k_labels.dim() != 3 or block_map.dim() != 4:
            raise ValueError("expected q_labels/k_labels (B, H, S) and block_map (B, H, Cq, Ck), got "
                             f"{tuple(q_labels.shape)}, {tuple(k_labels.shape)}, {tuple(block_map.shape)}")
        cq, ck = block_map.shape[-2:]
        q_labels = q_labels.long()
        k_labels = k_labels.long()
        if q_sizes is None:
            q_sizes = _bincount(q_labels, cq)
        if k_sizes is None:
            k_sizes = _bincount(k_labels, ck)
        if q_perm is None:
            q_perm = torch.sort(q_labels, dim=-1, stable=True).indices
        if k_perm is None:
            k_perm = torch.sort(k_labels, dim=-1, stable=True).indices
        return cls(q_labels, k_labels, q_sizes.long(), k_sizes.long(), q_perm.long(), k_perm.long(), block_map,
                   num_text_tokens, text_mask)

    # ------------------------------------------------------------------------------------- properties
    @property
    def batch(self) -> int:
        return self.block_map.shape[0]

    @property
    def heads(self) -> int:
        return self.block_map.shape[1]

    @property
    def num_q_clusters(self) -> int:
        return self.block_map.shape[2]

    @property
    def num_k_clusters(self) -> int:
        return self.block_map.shape[3]

    @property
    def q_offsets(self) -> torch.Tensor:
        """(B, H, Cq + 1) int64: start of every query cluster in sorted order, plus the end."""
        return _exclusive_cumsum(self.q_sizes)

    @property
    def k_offsets(self) -> torch.Tensor:
        """(B, H, Ck + 1) int64."""
        return _exclusive_cumsum(self.k_sizes)

    # ------------------------------------------------------------------------------------ kernel plan
    def plan(
        self,
        kernel: str = "auto",
        *,
        head_dim: int,
        dtype: torch.dtype,
        tiles: TileConfig | dict[str, Any] | None = None,
    ) -> AttentionPlan:
        """The kernel plan of this layout (built once, on the layout's device, no host sync; reuse it).

        Covers the video queries (cluster-sorted, Sq rows) against the cluster-sorted video keys followed by
        the text keys, real ones first: the text keys form one extra key cluster that every query cluster
        selects, and padded text keys lie past its end, so they are never attended.

        Args:
            kernel: attention kernel name or "auto" (``plan.kernel`` says which one will run).
            head_dim, dtype: of the Q/K/V the plan will run on (the kernel choice depends on them).
            tiles: Triton tile overrides (``svg2_kernels.TileConfig`` or a mapping of its fields).
        """
        q_off, k_off, bm = self.q_offsets, self.k_offsets, self.block_map
        sv = self.k_labels.shape[-1]
        t = self.num_text_tokens
        if t > 0:
            b, h = bm.shape[:2]
            if self.text_mask is not None:
                real = self.text_mask.sum(-1)[:, None].expand(b, h)
            else:
                real = torch.full((b, h), t, dtype=torch.long, device=bm.device)
            k_off = torch.cat([k_off, (sv + real).unsqueeze(-1)], dim=-1)
            bm = torch.cat([bm, torch.ones(*bm.shape[:-1], 1, dtype=torch.bool, device=bm.device)], dim=-1)
        return build_plan(q_off, k_off, bm, self.q_labels.shape[-1], sv + t, head_dim=head_dim, dtype=dtype,
                          kernel=kernel, tiles=tiles)

    # --------------------------------------------------------------------------------------- queries
    def pair_counts(self) -> torch.Tensor:
        """Kept token pairs of the clustered (video x video) block per (B, H): float64."""
        pairs = self.q_sizes.double().unsqueeze(-1) * self.k_sizes.double().unsqueeze(-2)
        return (pairs * self.block_map).sum(dim=(-1, -2))

    def density_per_head(self) -> torch.Tensor:
        """(B, H) float64: kept share of the video x video token pairs."""
        total = self.q_sizes.sum(-1).double() * self.k_sizes.sum(-1).double()
        return self.pair_counts() / total

    def density(self) -> float:
        """Mean over (batch, head) of ``density_per_head()`` (one host sync; for reporting)."""
        return float(self.density_per_head().mean())

    def sparsity(self) -> float:
        """1 - density(), for readers used to FlexAttention's BlockMask."""
        return 1.0 - self.density()

    def to_dense(self) -> torch.Tensor:
        """Token mask (B, H, Sq + T, Sk + T) bool in token order: ``M[x, y] = block_map[lq[x], lk[y]]``
        on the video block; text queries see every real key, video queries see every real text key;
        padded text keys are masked. Memory is O(S^2): for tests and small inputs only."""
        b, h, cq, ck = self.block_map.shape
        lq = self.q_labels
        lk = self.k_labels
        rows = torch.gather(self.block_map, 2, lq.unsqueeze(-1).expand(b, h, lq.shape[-1], ck))
        video = torch.gather(rows, 3, lk.unsqueeze(2).expand(b, h, lq.shape[-1], lk.shape[-1]))
        t = self.num_text_tokens
        if t == 0:
            return video
        sq, sk = lq.shape[-1], lk.shape[-1]
        m = torch.ones(b, h, sq + t, sk + t, dtype=torch.bool, device=video.device)
        m[:, :, :sq, :sk] = video
        if self.text_mask is not None:
            m[:, :, :, sk:] &= self.text_mask[:, None, None, :]
        return m

    def to(self, device: torch.device | str) -> ClusterLayout:
        move = lambda t: None if t is None else t.to(device)
        return ClusterLayout(move(self.q_labels), move(self.k_labels), move(self.q_sizes),
                             move(self.k_sizes), move(self.q_perm), move(self.k_perm),
                             move(self.block_map), self.num_text_tokens, move(self.text_mask))

    def __getitem__(self, index) -> ClusterLayout:
        """Index batch (and head) like a tensor: ``layout[0]``, ``layout[:, 3:4]``. Dims are kept."""
        if not isinstance(index, tuple):
            index = (index,)
        index = tuple(slice(i, i + 1) if isinstance(i, int) else i for i in index)
        pick = lambda t: t[index]
        tm = None if self.text_mask is None else self.text_mask[index[:1]]
        return ClusterLayout(pick(self.q_labels), pick(self.k_labels), pick(self.q_sizes),
                             pick(self.k_sizes), pick(self.q_perm), pick(self.k_perm),
                             pick(self.block_map), self.num_text_tokens, tm)

    def __repr__(self) -> str:
        b, h, cq, ck = self.block_map.shape
        lines = [
            f"ClusterLayout(batch={b}, heads={h}, q_tokens={self.q_labels.shape[-1]}, "
            f"k_tokens={self.k_labels.shape[-1]}, q_clusters={cq}, k_clusters={ck}, "
            f"text_tokens={self.num_text_tokens}, density={self.density():.2%}, "
            f"device={self.block_map.device.type})"
        ]
        # Draw the block map of (0, 0) coarsely, like BlockMask's repr: '#' mostly kept, '.' mostly not.
        rows, cols = min(cq, 16), min(ck, 48)
        bm = self.block_map[0, 0].float()[None, None]
        grid = torch.nn.functional.adaptive_avg_pool2d(bm, (rows, cols))[0, 0]
        for r in range(rows):
            lines.append("  " + "".join("#" if v >= 0.5 else ("+" if v > 0 else ".") for v in grid[r].tolist()))
        return "\n".join(lines)


def _bincount(labels: torch.Tensor, num_clusters: int) -> torch.Tensor:
    sizes = torch.zeros(*labels.shape[:-1], num_clusters, dtype=torch.long, device=labels.device)
    return sizes.scatter_add_(-1, labels, torch.ones_like(labels))
