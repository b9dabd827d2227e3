"""``MiniPipeline``: text-to-video with the mini model, with the call shape of diffusers' ``WanPipeline``.

The denoising loop mirrors ``WanPipeline``: ``scheduler.set_timesteps`` at the start of every call, then
per step one transformer call for the conditional branch and one for the unconditional branch (each
inside ``transformer.cache_context("cond" | "uncond", ...)``), classifier-free guidance, scheduler step.
So processors and forward pre-hooks installed on ``pipe.transformer`` (``svg2.integrations.enable_svg2``)
see the same sequence of calls as on Wan.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler, WanTransformer3DModel
from safetensors.torch import load_file, save_file

from svg2.mini.model import LATENT_CHANNELS, UNSHUFFLE, check_size, num_tokens, unpack
from svg2.mini.text import CaptionTokenizer, MiniTextEncoder

__all__ = ["OPERATING_POINTS", "MiniPipeline", "MiniPipelineOutput", "load_mini_pipeline", "default_weights_path"]

# Two operating points of the same weights. quick: ~1k tokens, a video in well under a minute on 2 CPU
# cores. long: 8192 tokens, where self-attention dominates (GPU studies).
OPERATING_POINTS: dict[str, dict] = {
    "quick": {"height": 64, "width": 64, "num_frames": 16, "num_inference_steps": 20, "guidance_scale": 5.0},
    "long": {"height": 128, "width": 128, "num_frames": 32, "num_inference_steps": 30, "guidance_scale": 5.0},
}
SCHEDULER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
    "solver_order": 2,
}


def default_weights_path() -> Path:
    """``<repo>/weights/mini``, the folder the shipped weights live in."""
    return Path(__file__).resolve().parents[2] / "weights" / "mini"


@dataclass
class MiniPipelineOutput:
    """``frames``: (batch, num_frames, height, width, 3) in [0, 1]: numpy float32 for output_type="np",
    a torch tensor for "pt"; latents for "latent" (batch, 48, num_frames, height/4, width/4)."""

    frames: np.ndarray | torch.Tensor


class MiniPipeline:
    """Text-to-video pipeline of the mini model. Components: ``transformer`` (a diffusers
    ``WanTransformer3DModel``), ``text_encoder`` (:class:`MiniTextEncoder`), ``tokenizer``, ``scheduler``.
    ``operating_points`` names the sizes the weights were trained for (a subclass sets its own)."""

    operating_points: dict[str, dict] = OPERATING_POINTS

    def __init__(self, transformer: WanTransformer3DModel, text_encoder: MiniTextEncoder,
                 tokenizer: CaptionTokenizer, scheduler=None, variant: str = "quick") -> None:
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler if scheduler is not None else UniPCMultistepScheduler(**SCHEDULER_CONFIG)
        if variant not in self.operating_points:
            raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(self.operating_points)}")
        self.variant = variant
        self.defaults = dict(self.operating_points[variant])

    # -- diffusers-like plumbing -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.proj_out.weight.dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> MiniPipeline:
        """Move / cast. In half precision the transformer keeps the modules diffusers keeps in float32
        (``_keep_in_fp32_modules``: rope, time embedder, norms, scale-shift tables), as ``from_pretrained``
        with ``torch_dtype`` does."""
        torch.nn.Module.to(self.transformer, device=device, dtype=dtype)
        self.text_encoder.to(device=device, dtype=dtype)
        if dtype in (torch.float16, torch.bfloat16):
            keep = set(self.transformer._keep_in_fp32_modules or [])
            for name, param in self.transformer.named_parameters():
                if keep & set(name.split(".")):
                    param.data = param.data.float()
        return self

    def save_pretrained(self, path: str | Path, dtype: torch.dtype = torch.bfloat16) -> None:
        """Write the diffusers-style folder: transformer/, text_encoder/, scheduler/ (weights in ``dtype``)."""
        path = Path(path)
        (path / "transformer").mkdir(parents=True, exist_ok=True)
        (path / "text_encoder").mkdir(parents=True, exist_ok=True)
        (path / "scheduler").mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.transformer.state_dict().items()}
        save_file(sd, str(path / "transformer" / "diffusion_pytorch_model.safetensors"))
        cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.transformer.config.items()
               if not k.startswith("_")}
        (path / "transformer" / "config.json").write_text(
            json.dumps({"_class_name": "WanTransformer3DModel", **cfg}, indent=2))
        te = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.text_encoder.state_dict().items()}
        save_file(te, str(path / "text_encoder" / "model.safetensors"))
        (path / "text_encoder" / "config.json").write_text(
            json.dumps({**self.text_encoder.config, "vocab": self.tokenizer.vocab}, indent=2))
        (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path, variant: str = "quick", device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> MiniPipeline:
        path = Path(path)
        tf_file = path / "transformer" / "diffusion_pytorch_model.safetensors"
        te_file = path / "text_encoder" / "model.safetensors"
        missing = [str(p) for p in (tf_file, te_file) if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"mini model weights not found: {', '.join(missing)}. They ship with the repository under "
                f"weights/mini/; recreate them with `python experiments/train_mini.py` (see "
                f"weights/mini/MODEL_CARD.md) or pass path= to load_mini_pipeline.")
        tf_cfg = json.loads((path / "transformer" / "config.json").read_text())
        tf_cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in tf_cfg.items() if not k.startswith("_")}
        transformer = WanTransformer3DModel(**tf_cfg)
        transformer.load_state_dict({k: v.float() for k, v in load_file(str(tf_file)).items()})
        te_cfg = json.loads((path / "text_encoder" / "config.json").read_text())
        vocab = te_cfg.pop("vocab")
        tokenizer = CaptionTokenizer(vocab[3:], max_len=te_cfg["max_len"])
        if tokenizer.vocab != vocab:
            raise ValueError(f"{path}/text_encoder/config.json: vocabulary must start with <pad> <null> <unk>")
        text_encoder = MiniTextEncoder(**te_cfg)
        text_encoder.load_state_dict({k: v.float() for k, v in load_file(str(te_file)).items()})
        sched_file = path / "scheduler" / "scheduler_config.json"
        sched_cfg = json.loads(sched_file.read_text()) if sched_file.is_file() else SCHEDULER_CONFIG
        pipe = cls(transformer.eval(), text_encoder.eval(), tokenizer,
                   UniPCMultistepScheduler(**sched_cfg), variant=variant)
        return pipe.to(device, dtype)

    # -- inference ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompt: list[str]) -> torch.Tensor:
        """(B,) captions -> (B, L, text_dim) encoder_hidden_states in the transformer's dtype."""
        unknown = sorted({w for p in prompt for w in self.tokenizer.unknown_words(p)})
        if unknown:
            raise ValueError(
                f"words outside the mini model's caption vocabulary: {unknown}. Known words: "
                f"{' '.join(self.tokenizer.vocab[3:])}")
        ids, mask = self.tokenizer(prompt)
        dev = self.device
        return self.text_encoder(ids.to(dev), mask.to(dev)).to(self.dtype)

    def tokens(self, num_frames: int | None = None, height: int | None = None, width: int | None = None) -> int:
        d = self.defaults
        return num_tokens(num_frames or d["num_frames"], height or d["height"], width or d["width"])

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict | None = None,
    ):
        """Generate videos. Unset sizes and settings come from the pipeline's operating point.

        Noise is drawn on the CPU from ``generator`` (same video on any device for a seed). A list of
        generators (one per prompt, as diffusers' ``randn_tensor`` takes it) draws each video's noise from its
        own generator, so item i of a batch starts from the noise of the single call with ``generator[i]``.
        Returns :class:`MiniPipelineOutput` (or a tuple ``(frames,)`` with ``return_dict=False``).
        """
        d = self.defaults
        num_frames = num_frames or d["num_frames"]
        height, width = height or d["height"], width or d["width"]
        steps = num_inference_steps or d["num_inference_steps"]
        guidance_scale = d["guidance_scale"] if guidance_scale is None else guidance_scale
        check_size(num_frames, height, width)
        if output_type not in ("np", "pt", "latent"):
            raise ValueError(f"output_type must be 'np', 'pt' or 'latent', got {output_type!r}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negative_prompt = negative_prompt if negative_prompt is not None else ""
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
        do_cfg = guidance_scale > 1.0
        dev, dtype = self.device, self.dtype

        prompt_embeds = self.encode_prompt(prompts)
        negative_embeds = self.encode_prompt(negatives) if do_cfg else None

        shape = (len(prompts), LATENT_CHANNELS, num_frames, height // UNSHUFFLE, width // UNSHUFFLE)
        if latents is None:
            latents = _initial_noise(shape, generator)
        latents = latents.to(dev, torch.float32)

        self.scheduler.set_timesteps(steps, device=dev)
        timesteps = self.scheduler.timesteps
        for i, t in enumerate(timesteps):
            model_in = latents.to(dtype)
            timestep = t.expand(latents.shape[0])
            ctx = {"step_index": i, "sigma": float(self.scheduler.sigmas[i]), "num_inference_steps": steps}
            with self.transformer.cache_context("cond", **ctx):
                pred = self.transformer(hidden_states=model_in, timestep=timestep,
                                        encoder_hidden_states=prompt_embeds, attention_kwargs=attention_kwargs,
                                        return_dict=False)[0]
            if do_cfg:
                with self.transformer.cache_context("uncond", **ctx):
                    pred_uncond = self.transformer(hidden_states=model_in, timestep=timestep,
                                                   encoder_hidden_states=negative_embeds,
                                                   attention_kwargs=attention_kwargs, return_dict=False)[0]
                pred = pred_uncond + guidance_scale * (pred - pred_uncond)
            latents = self.scheduler.step(pred.float(), t, latents, return_dict=False)[0]

        if output_type == "latent":
            frames = latents
        else:
            video = unpack(latents.float())  # (B, 3, F, H, W)
            frames = video.permute(0, 2, 3, 4, 1)
            if output_type == "np":
                frames = frames.cpu().numpy()
        return MiniPipelineOutput(frames=frames) if return_dict else (frames,)


def _initial_noise(shape: tuple[int, ...], generator: torch.Generator | list[torch.Generator] | None
                   ) -> torch.Tensor:
    """float32 CPU noise of ``shape``; a list of generators draws each item (1, ...) from its own."""
    if not isinstance(generator, (list, tuple)):
        return torch.randn(shape, generator=generator, dtype=torch.float32)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]} videos: pass one per prompt")
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generator])


def load_mini_pipeline(variant: str = "quick", device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32, path: str | Path | None = None) -> MiniPipeline:
    """Load the shipped mini text-to-video pipeline at an operating point ("quick" or "long").

    Raises FileNotFoundError naming the missing files if the weights are absent.
    """
    return MiniPipeline.from_pretrained(path or default_weights_path(), variant=variant, device=device,
                                        dtype=dtype)


def _weights_path(path: str | Path | None = None, **_: object) -> Path:
    """The folder ``load_mini_pipeline`` reads (the harness hashes its content into reference and row keys)."""
    return Path(path) if path else default_weights_path()


load_mini_pipeline.weights_path = _weights_path  # type: ignore[attr-defined]
