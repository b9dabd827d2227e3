"""Tiny randomly initialised diffusers models built from configs (nothing downloaded), for integration tests."""

from __future__ import annotations

import torch

from svg2 import SVG2Config

# Small clusters so that the tiny sequences (a few hundred video tokens) are really clustered.
TINY_CFG = SVG2Config(num_q_centroids=8, num_k_centroids=16, kmeans_iters_init=10, dense_steps_frac=0.0,
                      dense_layers=0)


def tiny_wan(num_layers: int = 3, i2v: bool = False, seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    extra = dict(image_dim=8, added_kv_proj_dim=32) if i2v else {}
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=num_layers, rope_max_seq_len=32, **extra,
    ).eval()


def wan_inputs(batch: int = 1, frames: int = 4, size: int = 16, text_len: int = 7, seed: int = 1, i2v=False):
    """Kwargs of a WanTransformer3DModel forward: frames * (size/2)^2 video tokens (256 by default)."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(
        hidden_states=torch.randn(batch, 4, frames, size, size, generator=g),
        timestep=torch.full((batch,), 500.0),
        # Wan I2V's stock processor takes the last 512 context tokens as text.
        encoder_hidden_states=torch.randn(batch, 512 if i2v else text_len, 16, generator=g),
        return_dict=False,
    )
    if i2v:
        kw["encoder_hidden_states_image"] = torch.randn(batch, 5, 8, generator=g)
    return kw


def tiny_hunyuan(seed: int = 0):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), guidance_embeds=True,
    ).eval()


def hunyuan_inputs(batch: int = 2, frames: int = 4, size: int = 16, text_len: int = 12, real=(12, 5), seed=1):
    """Text padded at the end: sample i has real[i] real text tokens out of text_len."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, text_len, dtype=torch.long)
    for i in range(batch):
        mask[i, : real[i % len(real)]] = 1
    return dict(
        hidden_states=torch.randn(batch, 4, frames, size, size, generator=g),
        timestep=torch.full((batch,), 500.0),
        encoder_hidden_states=torch.randn(batch, text_len, 16, generator=g),
        encoder_attention_mask=mask,
        pooled_projections=torch.randn(batch, 8, generator=g),
        guidance=torch.full((batch,), 6000.0),
        return_dict=False,
    )


def tiny_tokenizer(max_length: int = 16):
    """A word-level fast tokenizer built in memory (no files, no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "a red blue green ball cube moves left right up down on black white background slowly fast".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)


def tiny_wan_pipeline(two_experts: bool = False):
    """WanPipeline with a tiny VAE, a tiny UMT5 text encoder and a tiny tokenizer, all built locally."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                               num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0))
    kw = {}
    if two_experts:
        kw = dict(transformer_2=tiny_wan(num_layers=2, seed=1), boundary_ratio=0.5)
    return WanPipeline(tokenizer=tiny_tokenizer(), text_encoder=text_encoder.eval(), vae=vae.eval(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=tiny_wan(num_layers=2),
                       **kw)
