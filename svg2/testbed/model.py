"""The testbed model: a ``WanTransformer3DModel`` trained on world clips, its weights format and pipeline.

Same latent space, objective and sampler as the mini model (``svg2.mini.model``: 4x4 pixel-unshuffle, so
8 x 8 pixels per token with the (1, 2, 2) patch; rectified flow; UniPC with flow shift 3), but deeper and
wider and trained on clips that need content-based attention (``svg2.testbed.data``).

Weights are stored with 8-bit matrices (symmetric, one scale per output row) and everything else in bf16:
the repository travels to the GPU machine in at most 64 MiB, and a 20 M-parameter model is 40 MB in bf16.
The dense reference and every sparse run load the same dequantised weights, so fidelity comparisons are
unaffected; the file is ``diffusion_pytorch_model.int8.safetensors`` so that a plain diffusers
``from_pretrained`` never mistakes it for a float checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import UniPCMultistepScheduler, WanTransformer3DModel
from safetensors import safe_open
from safetensors.torch import save_file

from svg2.mini.model import LATENT_CHANNELS, build_transformer
from svg2.mini.pipeline import SCHEDULER_CONFIG, MiniPipeline
from svg2.mini.text import CaptionTokenizer, MiniTextEncoder
from svg2.testbed.data import caption_vocabulary

__all__ = [
    "TESTBED_TRANSFORMER_CONFIG",
    "TESTBED_TEXT_ENCODER_CONFIG",
    "TESTBED_POINTS",
    "TestbedPipeline",
    "build_testbed",
    "quantize_state",
    "dequantize_state",
    "save_testbed",
    "load_testbed_pipeline",
    "default_testbed_path",
    "caption_tokenizer",
]

TESTBED_TRANSFORMER_CONFIG: dict = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 6,
    "attention_head_dim": 64,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "text_dim": 256,
    "freq_dim": 256,
    "ffn_dim": 1536,
    "num_layers": 8,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
TESTBED_TEXT_ENCODER_CONFIG: dict = {"dim": 256, "num_layers": 2, "num_heads": 4, "ffn_dim": 512, "max_len": 56}

# Operating points of the same weights. eval: the structure and quality figures (8,192 tokens);
# long: 16,384 tokens (frames twice as wide); quick: 1,024 tokens, a CPU-sized point.
TESTBED_POINTS: dict[str, dict] = {
    "quick": {"height": 64, "width": 64, "num_frames": 16, "num_inference_steps": 20, "guidance_scale": 5.0},
    "eval": {"height": 128, "width": 128, "num_frames": 32, "num_inference_steps": 30, "guidance_scale": 5.0},
    "long": {"height": 128, "width": 256, "num_frames": 32, "num_inference_steps": 30, "guidance_scale": 5.0},
}
_TF_FILE = "diffusion_pytorch_model.int8.safetensors"
_TF_SHARD = "diffusion_pytorch_model.int8-{:05d}-of-{:05d}.safetensors"
SHARD_BYTES = 14 * 2**20  # files come back from the GPU machine at most 16 MiB each
_TE_FILE = "model.safetensors"
_SCALE = ".__scale__"


def default_testbed_path() -> Path:
    """``<repo>/weights/testbed``."""
    return Path(__file__).resolve().parents[2] / "weights" / "testbed"


def build_testbed(**overrides) -> WanTransformer3DModel:
    """A freshly initialised testbed transformer (``overrides`` replace config entries)."""
    return build_transformer(**{**TESTBED_TRANSFORMER_CONFIG, **overrides})


def quantize_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """2-D float matrices -> int8 plus a float32 scale per row (``name.__scale__``); the rest -> bf16."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        t = t.detach().to("cpu")
        if t.dim() == 2 and t.is_floating_point() and t.numel() >= 4096:
            scale = t.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
            out[name] = (t.float() / scale).round().clamp(-127, 127).to(torch.int8).contiguous()
            out[name + _SCALE] = scale.contiguous()
        else:
            out[name] = t.to(torch.bfloat16).contiguous() if t.is_floating_point() else t.contiguous()
    return out


def dequantize_state(q: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`quantize_state`, in float32."""
    out = {}
    for name, t in q.items():
        if name.endswith(_SCALE):
            continue
        if t.dtype == torch.int8:
            if name + _SCALE not in q:
                raise ValueError(f"int8 tensor {name!r} has no scale {name + _SCALE!r}: the weight file is damaged")
            out[name] = t.float() * q[name + _SCALE].float()
        else:
            out[name] = t.float()
    return out


class TestbedPipeline(MiniPipeline):
    """The mini pipeline's sampler and call shape at the testbed's operating points."""

    operating_points = TESTBED_POINTS

    def __init__(self, *args, variant: str = "eval", **kwargs) -> None:
        super().__init__(*args, variant=variant, **kwargs)


def save_testbed(transformer: WanTransformer3DModel | dict, text_encoder: MiniTextEncoder | dict,
                 tokenizer: CaptionTokenizer, path: str | Path, transformer_config: dict,
                 text_encoder_config: dict, meta: dict | None = None) -> Path:
    """Write ``path/{transformer,text_encoder,scheduler}`` (8-bit matrices) and ``training_meta.json``."""
    path = Path(path)
    for sub in ("transformer", "text_encoder", "scheduler"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    tf_sd = transformer if isinstance(transformer, dict) else transformer.state_dict()
    te_sd = text_encoder if isinstance(text_encoder, dict) else text_encoder.state_dict()
    _save_sharded(quantize_state(tf_sd), path / "transformer")
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in transformer_config.items()}
    (path / "transformer" / "config.json").write_text(
        json.dumps({"_class_name": "WanTransformer3DModel", **cfg}, indent=2))
    save_file({k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in te_sd.items()},
              str(path / "text_encoder" / _TE_FILE))
    (path / "text_encoder" / "config.json").write_text(
        json.dumps({**text_encoder_config, "vocab_size": len(tokenizer), "vocab": tokenizer.vocab}, indent=2))
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
    if meta is not None:
        (path / "training_meta.json").write_text(json.dumps(meta, indent=2, default=str))
    return path


def _save_sharded(state: dict[str, torch.Tensor], folder: Path) -> list[Path]:
    """One file when it fits in SHARD_BYTES, else numbered shards (a tensor and its scale stay together)."""
    for old in list(folder.glob("diffusion_pytorch_model.int8*.safetensors")):
        old.unlink()
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(k for k in state if not k.endswith(_SCALE)):
        part = {name: state[name], **({name + _SCALE: state[name + _SCALE]} if name + _SCALE in state else {})}
        nbytes = sum(t.numel() * t.element_size() for t in part.values())
        if size + nbytes > SHARD_BYTES and groups[-1]:
            groups.append({})
            size = 0
        groups[-1].update(part)
        size += nbytes
    if len(groups) == 1:
        names = [_TF_FILE]
    else:
        names = [_TF_SHARD.format(i + 1, len(groups)) for i in range(len(groups))]
    paths = []
    for name, group in zip(names, groups):
        save_file(group, str(folder / name))
        paths.append(folder / name)
    return paths


def _weight_files(folder: Path) -> list[Path]:
    single = folder / _TF_FILE
    if single.is_file():
        return [single]
    shards = sorted(folder.glob("diffusion_pytorch_model.int8-*-of-*.safetensors"))
    if shards:
        expected = int(shards[0].name.split("-of-")[1].split(".")[0])
        if len(shards) != expected:
            raise FileNotFoundError(f"{folder}: {len(shards)} of {expected} weight shards present")
    return shards


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(file), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def load_testbed_state(path: str | Path) -> tuple[dict, dict, dict, dict]:
    """(transformer state, transformer config, text-encoder state, text-encoder config incl. vocab), float32."""
    path = Path(path)
    tf_files, te_file = _weight_files(path / "transformer"), path / "text_encoder" / _TE_FILE
    missing = [str(p) for p in (te_file, path / "transformer" / "config.json") if not p.is_file()]
    if not tf_files:
        missing.append(str(path / "transformer" / _TF_FILE))
    if missing:
        raise FileNotFoundError(
            f"testbed weights not found: {', '.join(missing)}. They ship with the repository under "
            f"weights/testbed/ (see its MODEL_CARD.md); retrain with `python experiments/train_testbed.py` or "
            f"pass path= to load_testbed_pipeline.")
    tf_cfg = json.loads((path / "transformer" / "config.json").read_text())
    tf_cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in tf_cfg.items() if not k.startswith("_")}
    te_cfg = json.loads((path / "text_encoder" / "config.json").read_text())
    te_state = {k: v.float() for k, v in _load_safetensors(te_file).items()}
    quantized: dict[str, torch.Tensor] = {}
    for file in tf_files:
        quantized.update(_load_safetensors(file))
    return dequantize_state(quantized), tf_cfg, te_state, te_cfg


def load_testbed_pipeline(variant: str = "eval", device: torch.device | str = "cpu",
                          dtype: torch.dtype = torch.float32, path: str | Path | None = None) -> TestbedPipeline:
    """Load the shipped testbed text-to-video pipeline at an operating point ("quick", "eval" or "long").

    Raises FileNotFoundError naming the missing files if the weights are absent."""
    tf_state, tf_cfg, te_state, te_cfg = load_testbed_state(path or default_testbed_path())
    transformer = WanTransformer3DModel(**tf_cfg)
    transformer.load_state_dict(tf_state)
    te_cfg = dict(te_cfg)
    vocab = te_cfg.pop("vocab")
    tokenizer = CaptionTokenizer(vocab[3:], max_len=te_cfg["max_len"])
    if tokenizer.vocab != vocab:
        raise ValueError("text_encoder/config.json: vocabulary must start with <pad> <null> <unk>")
    text_encoder = MiniTextEncoder(**te_cfg)
    text_encoder.load_state_dict(te_state)
    pipe = TestbedPipeline(transformer.eval(), text_encoder.eval(), tokenizer,
                           UniPCMultistepScheduler(**SCHEDULER_CONFIG), variant=variant)
    return pipe.to(device, dtype)


def _weights_path(path: str | Path | None = None, **_: object) -> Path:
    """The folder ``load_testbed_pipeline`` reads (the harness hashes its content into reference and row keys)."""
    return Path(path) if path else default_testbed_path()


load_testbed_pipeline.weights_path = _weights_path  # type: ignore[attr-defined]


def caption_tokenizer(max_len: int = TESTBED_TEXT_ENCODER_CONFIG["max_len"]) -> CaptionTokenizer:
    """The whitespace tokenizer over the world-clip caption vocabulary."""
    return CaptionTokenizer(caption_vocabulary(), max_len=max_len)
