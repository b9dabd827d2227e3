"""FlashInfer's variable-block sparse attention (``VariableBlockSparseAttentionWrapper``), side by side with ours.

Named only (``attention_kernel="flashinfer"``, harness ``kernel=flashinfer``): its priority is below ``torch``, so
``auto`` never picks it. Available when ``flashinfer`` imports, e.g. from the trimmed copy that
``experiments/vendor_flashinfer.py`` builds from the 0.7.2.post1 wheel (``PYTHONPATH=.flashinfer/site``); otherwise
it refuses and says so. FlashInfer takes per-head block row / column sizes and a block map, exactly the
cluster layout: (batch, heads) fold into its head axis, and the rows / keys past the last cluster (padded text
keys, tail rows) become one extra unselected block so the sizes cover the whole sequence. Its ``plan`` copies
the block index to the host (a sync): it belongs in ``plan``, never in the timed ``run``. FlashInfer's LSE is
base 2; ``run`` returns it in natural log like every other variant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from svg2_kernels.plan import AttentionPlan
from svg2_kernels.registry import AttentionInputs, AttentionVariant, register_attention_variant

__all__ = ["FlashInferVarBlockAttention", "flashinfer_block_sizes", "flashinfer_import_error"]

_WORKSPACE_BYTES = 128 * 2**20  # FlashInfer's recommended float workspace
_workspaces: dict[torch.device, torch.Tensor] = {}


def flashinfer_import_error() -> str | None:
    """None when ``flashinfer.sparse.VariableBlockSparseAttentionWrapper`` imports, else why not."""
    try:
        from flashinfer.sparse import VariableBlockSparseAttentionWrapper  # noqa: F401
    except Exception as e:  # ImportError, or a trimmed copy missing a module / a native dependency
        return f"{type(e).__name__}: {e}"
    return None


def flashinfer_block_sizes(offsets: torch.Tensor, seqlen: int) -> torch.Tensor:
    """(B, H, C + 1) offsets (starting at 0) -> (B*H, C + 1) int32 block sizes: the C clusters, then one tail
    block of the ``seqlen - offsets[..., -1]`` rows past the last cluster (the plan leaves it unselected)."""
    b, h = offsets.shape[:2]
    sizes = (offsets[..., 1:] - offsets[..., :-1]).reshape(b * h, -1)
    tail = (seqlen - offsets[..., -1]).reshape(b * h, 1)
    return torch.cat([sizes, tail], dim=1).to(torch.int32)


@dataclass
class _FlashInferPlan:
    wrapper: Any
    heads: int


class FlashInferVarBlockAttention(AttentionVariant):
    name = "flashinfer"
    priority = -1  # never chosen by "auto" (torch, priority 0, accepts everything): a side-by-side kernel
    devices = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16)
    head_dims = (64, 128, 256)
    requires = ("flashinfer",)

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        reasons = super().not_supported_reasons(inputs)
        if reasons and any("not installed" in r for r in reasons):
            reasons = [r.replace("is not installed", "is not installed (build the trimmed copy with "
                                 "experiments/vendor_flashinfer.py and put .flashinfer/site on PYTHONPATH)")
                       for r in reasons]
            return reasons
        error = flashinfer_import_error()
        if error is not None:
            reasons.append(f"flashinfer is present but VariableBlockSparseAttentionWrapper does not import ({error})")
        return reasons

    def plan(self, q_offsets, k_offsets, block_map, inputs, tiles, skipped=()):
        from flashinfer.sparse import VariableBlockSparseAttentionWrapper

        b, h, cq, ck = block_map.shape
        n = b * h
        device = block_map.device
        rows = flashinfer_block_sizes(q_offsets, inputs.seqlen_q)
        cols = flashinfer_block_sizes(k_offsets, inputs.seqlen_k)
        bm = torch.zeros(n, cq + 1, ck + 1, dtype=torch.bool, device=device)
        bm[:, :cq, :ck] = block_map.reshape(n, cq, ck)
        if device not in _workspaces:
            _workspaces[device] = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        wrapper = VariableBlockSparseAttentionWrapper(_workspaces[device])
        wrapper.plan(bm, rows, cols, num_qo_heads=n, num_kv_heads=n, head_dim=inputs.head_dim,
                     q_data_type=inputs.dtype, kv_data_type=inputs.dtype)
        return AttentionPlan(self, inputs, q_offsets, k_offsets, block_map, None, _FlashInferPlan(wrapper, n),
                             skipped)

    def run(self, q, k, v, plan, scale, q_perm, return_lse):
        data: _FlashInferPlan = plan.data
        if scale is not None and not math.isclose(scale, 1.0 / math.sqrt(q.shape[-1])):
            raise ValueError("flashinfer: the softmax scale is fixed when planning (1/sqrt(head_dim)); "
                             f"got scale={scale}")
        b, h, sq, d = q.shape
        fold = lambda x: x.reshape(b * h, x.shape[2], d)
        res = data.wrapper.run(fold(q), fold(k), fold(v), return_lse=return_lse)
        out, lse = res if return_lse else (res, None)
        out = out.reshape(b, h, sq, d)
        if lse is not None:
            lse = lse.float().reshape(b, h, sq) * math.log(2.0)  # base 2 -> natural log
        return out, lse


register_attention_variant(FlashInferVarBlockAttention())
