from __future__ import annotations

from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from svg2.attention import dense_attention
from svg2.methods.base import AttentionContext, AttentionMethod, register_method


@register_method("dense")
class DenseMethod(AttentionMethod):
    """Full attention through torch SDPA (cuDNN / flash on GPU): the baseline of every comparison.

    Accepts the issue-17 options only at their neutral values, and says why otherwise: dense attention skips no
    key (nothing to compensate) and has no layout (nothing to reuse)."""

    @classmethod
    def parameters(cls) -> frozenset[str]:
        # compensate / layout_every exist for enable_svg2 callers and take only their neutral values: nothing to set.
        return frozenset()

    def __init__(self, *, compensate: bool = False, layout_every: int = 1) -> None:
        if compensate:
            raise ValueError("compensate=True makes no sense for method 'dense': it computes every key exactly, so no "
                             "key group is skipped and there is nothing to compensate. Use a cluster or block method "
                             "(svg2, svg_ear, positional, sol_attn, ...)")
        if layout_every != 1:
            raise ValueError(f"layout_every={layout_every} makes no sense for method 'dense': it has no sparse layout "
                             "to reuse across steps. Leave layout_every=1")

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        out = dense_attention(q, k, v, num_text_tokens=ctx.num_text_tokens, text_mask=ctx.text_mask,
                              scale=ctx.scale)
        ctx.state.record(method=self.name, layer=ctx.layer_index, step=ctx.step_index, branch=ctx.branch,
                         density=1.0, dense=True)
        return out


@register_method("dense_floor")
class DenseFloorMethod(AttentionMethod):
    """Exact attention through a second exact path: torch SDPA in float32, cast back to the input dtype.
    Compared against the dense reference like any method, its row is the report's noise floor: a sparse
    method's difference from dense that is no larger than this one's is not a real difference.

    ``backend``: ``"efficient"`` (SDPA's memory-efficient kernel, CUDA only: float32, no score matrix),
    ``"math"`` (SDPA's math backend: it materialises the scores, so queries run in chunks of at most
    ``query_chunk`` rows; 0: as many as keep one chunk's float32 scores under 512 MiB; softmax is per query row,
    so chunking is exact) or ``"auto"`` (efficient on CUDA, math elsewhere). On the H200 the math path made the
    floor the slowest row of a testbed sweep by far (208 s for 32 videos against 12 s dense)."""

    _SCORE_BYTES = 512 * 2**20
    _BACKENDS = ("auto", "efficient", "math")

    def __init__(self, *, query_chunk: int = 0, backend: str = "auto") -> None:
        if isinstance(query_chunk, bool) or not isinstance(query_chunk, int) or query_chunk < 0:
            raise ValueError(f"query_chunk={query_chunk!r}: use a whole number of query rows >= 1, or 0 to size "
                             "chunks automatically")
        if backend not in self._BACKENDS:
            raise ValueError(f"backend={backend!r} is unknown for dense_floor; choose one of {self._BACKENDS}")
        self.query_chunk = query_chunk
        self.backend = backend

    def _chunk(self, q: torch.Tensor, k: torch.Tensor) -> int:
        if self.query_chunk:
            return self.query_chunk
        per_row = q.shape[0] * q.shape[1] * k.shape[2] * 4  # float32 scores of one query row, every head
        return max(1, self._SCORE_BYTES // per_row)

    def resolved_backend(self, device: torch.device) -> str:
        if self.backend == "efficient" and device.type != "cuda":
            raise ValueError(f"dense_floor backend='efficient' needs a CUDA device (the inputs are on {device}); "
                             "use backend='math' or 'auto'")
        if self.backend == "auto":
            return "efficient" if device.type == "cuda" else "math"
        return self.backend

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        kf, vf = k.float(), v.float()
        efficient = self.resolved_backend(q.device) == "efficient"
        step = q.shape[2] if efficient else self._chunk(q, k)
        outs = []
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION if efficient else SDPBackend.MATH):
            for i in range(0, q.shape[2], step):
                outs.append(dense_attention(q[:, :, i:i + step].float(), kf, vf, num_text_tokens=ctx.num_text_tokens,
                                            text_mask=ctx.text_mask, scale=ctx.scale).to(q.dtype))
        ctx.state.record(method=self.name, layer=ctx.layer_index, step=ctx.step_index, branch=ctx.branch,
                         density=1.0, dense=True)
        return torch.cat(outs, dim=2)

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "backend": self.backend, "query_chunk": self.query_chunk}


class StockAttention(AttentionMethod):
    """The pipeline's own attention processors, untouched: the true dense baseline (speedup 1). Nothing is
    installed, so it takes no parameters and ``enable_svg2`` refuses it (run the pipeline as it is).
    ``DenseMethod`` is the same math through svg2's processors (their overhead)."""

    name = "stock"
    stock = True
