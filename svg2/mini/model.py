"""The mini model: a small ``WanTransformer3DModel`` over a pixel-unshuffle latent space.

Latent space: RGB frames in [0, 1] -> [-1, 1] -> 4x4 pixel-unshuffle per frame -> 48 channels at H/4 x W/4.
With the transformer's patch size (1, 2, 2) a frame of H x W pixels becomes (H/8) x (W/8) tokens (8 x 8 at
64 x 64, 16 x 16 at 128 x 128); there is no temporal compression, so tokens = F * H * W / 64.

Training objective: rectified flow as in Wan: x_t = (1 - t) x_0 + t eps, the transformer predicts
eps - x_0 at timestep 1000 t.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel

__all__ = [
    "UNSHUFFLE",
    "LATENT_CHANNELS",
    "TRANSFORMER_CONFIG",
    "TEXT_ENCODER_CONFIG",
    "build_transformer",
    "pack",
    "unpack",
    "num_tokens",
    "flow_matching_loss",
    "sample_t",
]

UNSHUFFLE = 4
LATENT_CHANNELS = 3 * UNSHUFFLE * UNSHUFFLE  # 48
SPATIAL_FACTOR = UNSHUFFLE * 2  # pixels per token side (unshuffle x patch)

TRANSFORMER_CONFIG: dict = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 6,
    "attention_head_dim": 64,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "text_dim": 256,
    "freq_dim": 256,
    "ffn_dim": 1024,
    "num_layers": 6,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
TEXT_ENCODER_CONFIG: dict = {"dim": 256, "num_layers": 2, "num_heads": 4, "ffn_dim": 512, "max_len": 32}


def build_transformer(**overrides) -> WanTransformer3DModel:
    """A freshly initialised mini transformer (``overrides`` replace entries of TRANSFORMER_CONFIG)."""
    return WanTransformer3DModel(**{**TRANSFORMER_CONFIG, **overrides})


def num_tokens(num_frames: int, height: int, width: int) -> int:
    """Self-attention sequence length of a clip."""
    return num_frames * (height // SPATIAL_FACTOR) * (width // SPATIAL_FACTOR)


def check_size(num_frames: int, height: int, width: int) -> None:
    if height % SPATIAL_FACTOR or width % SPATIAL_FACTOR or num_frames < 1:
        raise ValueError(
            f"mini model needs height and width divisible by {SPATIAL_FACTOR} and num_frames >= 1, "
            f"got {num_frames} x {height} x {width}; try 64 x 64 or 128 x 128"
        )


def pack(video: torch.Tensor) -> torch.Tensor:
    """(B, 3, F, H, W) in [0, 1] -> latents (B, 48, F, H/4, W/4) in [-1, 1]."""
    B, C, F_, H, W = video.shape
    x = (video * 2 - 1).permute(0, 2, 1, 3, 4).reshape(B * F_, C, H, W)
    x = F.pixel_unshuffle(x, UNSHUFFLE)
    return x.reshape(B, F_, -1, H // UNSHUFFLE, W // UNSHUFFLE).permute(0, 2, 1, 3, 4).contiguous()


def unpack(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack`: (B, 48, F, h, w) -> (B, 3, F, 4h, 4w) in [0, 1] (clamped)."""
    B, C, F_, h, w = latents.shape
    x = latents.permute(0, 2, 1, 3, 4).reshape(B * F_, C, h, w)
    x = F.pixel_shuffle(x, UNSHUFFLE)
    x = x.reshape(B, F_, 3, h * UNSHUFFLE, w * UNSHUFFLE).permute(0, 2, 1, 3, 4)
    return ((x + 1) / 2).clamp(0, 1)


def sample_t(batch_size: int, generator: torch.Generator | None = None, shift: float = 3.0) -> torch.Tensor:
    """Training noise levels t in (0, 1): logit-normal, then the same time shift the sampler uses
    (t' = s t / (1 + (s - 1) t)) so that training covers the high-noise steps the sampler spends time on."""
    u = torch.sigmoid(torch.randn(batch_size, generator=generator))
    return shift * u / (1 + (shift - 1) * u)


def flow_matching_loss(transformer: WanTransformer3DModel, x0: torch.Tensor, text: torch.Tensor,
                       t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the velocity prediction. x0, noise: (B, 48, F, h, w); text: (B, L, text_dim);
    t: (B,) in (0, 1)."""
    tt = t.view(-1, 1, 1, 1, 1).to(x0.dtype)
    xt = (1 - tt) * x0 + tt * noise
    pred = transformer(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=text, return_dict=False)[0]
    return F.mse_loss(pred.float(), (noise - x0).float())
