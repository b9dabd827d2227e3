"""Training of the testbed model in budgeted stretches (flow matching on world clips).

The GPU comes in commands of at most 10 minutes; the machine keeps /tmp between back-to-back commands, not
between sessions. So a run
- resumes the full state (weights, EMA, optimizer, step, log, data RNG) from ``ckpt`` when it exists
  (``resume=True``: same stretch), else starts from the committed weights (``init_from``: the EMA becomes
  both the live weights and the EMA; the optimizer starts afresh; the step count and the log continue from
  the committed ``training_meta.json`` and log), else from scratch;
- stops by itself after ``time_budget`` seconds of training, saves the checkpoint, and exports the EMA
  weights (8-bit matrices) with an accumulated log.
The learning rate is constant after a linear warm-up (so stretches chain without a schedule length); the
EMA (decay 0.9995) does the averaging a decaying schedule would.
"""

from __future__ import annotations

import gzip
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from svg2.mini.model import flow_matching_loss, num_tokens, pack, sample_t
from svg2.mini.text import MiniTextEncoder
from svg2.testbed.data import captions, render, sample_scenes
from svg2.testbed.model import (
    TESTBED_TEXT_ENCODER_CONFIG,
    TESTBED_TRANSFORMER_CONFIG,
    build_testbed,
    caption_tokenizer,
    load_testbed_state,
    save_testbed,
)

__all__ = ["TrainConfig", "BUCKETS", "train", "plot_loss", "read_log"]

# (height, width, frames, weight): the eval point (8,192 tokens) dominates; the long point (16,384), shorter
# clips and the CPU-sized quick point keep the other sizes in distribution.
BUCKETS: list[tuple[int, int, int, float]] = [
    (128, 128, 32, 0.55),
    (128, 256, 32, 0.15),
    (128, 128, 16, 0.10),
    (96, 96, 24, 0.08),
    (64, 64, 16, 0.12),
]
TINY_BUCKETS: list[tuple[int, int, int, float]] = [(64, 64, 4, 0.5), (64, 64, 8, 0.5)]
LOG_NAME = "train_log.jsonl.gz"


@dataclass
class TrainConfig:
    out: str
    ckpt: str | None = None
    resume: bool = True
    init_from: str | None = None
    time_budget: float = 480.0
    max_steps: int | None = None
    tokens_per_step: int = 65536
    lr: float = 5e-4
    warmup: int = 300
    weight_decay: float = 0.01
    ema_decay: float = 0.9995
    cfg_dropout: float = 0.1
    seed: int = 0
    device: str = "cuda"
    tiny: bool = False
    checkpoint_every: float = 180.0
    transformer_overrides: dict = field(default_factory=dict)
    world_detail: float = 0.0  # data variant (svg2.testbed.data.render); 0 = the data of the shipped weights
    # LR multiplier of the self-attention qk-norm weights: they set the logit scale (q and k are RMS-normalised),
    # and after 7,102 steps at the base LR they had moved only from 1.0 to 0.93-1.27, so attention can sharpen
    # no faster than they grow. 1 = the base LR; 0 = frozen (keeps a --qk-norm-init-scale temperature: at 10x,
    # the scaled weights shrank back from a product of 2.1 to 1.7 in 1,900 steps and the top-15% mass with them).
    qk_norm_lr_mult: float = 1.0
    # Multiplies the self-attention qk-norm weights once, when a run starts from committed weights: logits scale
    # by its square, so attention starts sharper than the shipped weights' (1 = no change).
    qk_norm_init_scale: float = 1.0


class EMA:
    """fp32 exponential moving average of the floating-point state, decay warmed up as (1 + n) / (10 + n)."""

    def __init__(self, modules: dict[str, torch.nn.Module], decay: float, n: int = 0) -> None:
        self.decay, self.n = decay, n
        self.shadow = {f"{name}.{k}": v.detach().float().clone()
                       for name, m in modules.items() for k, v in m.state_dict().items()}
        live = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
        self._pairs = [(self.shadow[k], v) for k, v in live.items() if v.dtype.is_floating_point]

    @torch.no_grad()
    def update(self) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        shadows, lives = zip(*self._pairs)
        torch._foreach_lerp_(list(shadows), [v.float() for v in lives], 1 - d)

    def load(self, shadow: dict[str, torch.Tensor], n: int) -> None:
        for k, v in shadow.items():
            self.shadow[k].copy_(v)
        self.n = n

    def part(self, name: str) -> dict[str, torch.Tensor]:
        pre = name + "."
        return {k[len(pre):]: v for k, v in self.shadow.items() if k.startswith(pre)}


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_log(log: list[dict], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    with gzip.open(tmp, "wt") as f:
        for rec in log:
            f.write(json.dumps(rec) + "\n")
    tmp.replace(path)


def _batch(cfg: TrainConfig, buckets, gen: torch.Generator, tok, dev: torch.device):
    weights = torch.tensor([b[3] for b in buckets])
    h, w, f, _ = buckets[int(torch.multinomial(weights, 1, generator=gen))]
    bs = max(1, cfg.tokens_per_step // num_tokens(f, h, w))
    scene = sample_scenes(bs, gen, aspect=w / h)
    caps = captions(scene)
    drop = torch.rand(bs, generator=gen) < cfg.cfg_dropout
    ids, mask = tok(["" if d else c for c, d in zip(caps, drop.tolist())])
    with torch.no_grad():
        x0 = pack(render(scene, f, h, w, device=dev, world_detail=cfg.world_detail))
    return x0, ids.to(dev), mask.to(dev), sample_t(bs, gen).to(dev), (h, w, f, bs)


def is_self_attention_qk_norm(name: str) -> bool:
    """``blocks.N.attn1.norm_q.weight`` / ``norm_k``: the self-attention logit scale of a Wan block."""
    return ".attn1.norm_q." in name or ".attn1.norm_k." in name


@torch.no_grad()
def scale_self_attention_qk_norm(transformer: torch.nn.Module, scale: float) -> int:
    """Multiply every self-attention qk-norm weight by ``scale`` (the logits by ``scale**2``); returns how many
    tensors changed."""
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"qk_norm_init_scale={scale} must be a finite number > 0 (1 = no change)")
    if scale == 1.0:
        return 0
    n = 0
    for name, p in transformer.named_parameters():
        if is_self_attention_qk_norm("transformer." + name):
            p.mul_(scale)
            n += 1
    if n == 0:
        raise ValueError("no self-attention qk-norm weights (attn1.norm_q / norm_k) found; the transformer must be "
                         "built with qk_norm='rms_norm_across_heads'")
    return n


def param_groups(modules: dict[str, torch.nn.Module], cfg: TrainConfig) -> list[dict]:
    """AdamW groups: matrices with weight decay; vectors without; the self-attention qk-norm weights without
    decay and at ``qk_norm_lr_mult`` x the LR (a separate group only when the multiplier is not 1, so the
    optimizer state of earlier checkpoints keeps its layout)."""
    if not (cfg.qk_norm_lr_mult >= 0 and math.isfinite(cfg.qk_norm_lr_mult)):
        raise ValueError(f"qk_norm_lr_mult={cfg.qk_norm_lr_mult} must be a finite number >= 0 (1 = no change, "
                         "0 = frozen)")
    split = cfg.qk_norm_lr_mult != 1.0
    named = [(f"{m}.{n}", p) for m, mod in modules.items() for n, p in mod.named_parameters()]
    qk = [p for n, p in named if split and is_self_attention_qk_norm(n)]
    rest = [(n, p) for n, p in named if not (split and is_self_attention_qk_norm(n))]
    groups = [{"params": [p for _, p in rest if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for _, p in rest if p.ndim < 2], "weight_decay": 0.0}]
    if split:
        groups.append({"params": qk, "weight_decay": 0.0, "lr_mult": cfg.qk_norm_lr_mult})
    return groups


def train(cfg: TrainConfig) -> dict:
    """Run one budgeted stretch; returns a summary dict (also written to ``out/summary.json``)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(cfg.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    tf_cfg = {**TESTBED_TRANSFORMER_CONFIG, **cfg.transformer_overrides}
    te_cfg = dict(TESTBED_TEXT_ENCODER_CONFIG)
    buckets = BUCKETS
    if cfg.tiny:
        tf_cfg.update(num_layers=2, num_attention_heads=2, ffn_dim=128, text_dim=64)
        te_cfg.update(dim=64, num_layers=1, num_heads=2, ffn_dim=128)
        buckets = TINY_BUCKETS
    tok = caption_tokenizer(te_cfg["max_len"])
    torch.manual_seed(cfg.seed)
    transformer = build_testbed(**tf_cfg).to(dev).train()
    text_encoder = MiniTextEncoder(len(tok), **te_cfg).to(dev).train()
    modules = {"transformer": transformer, "text_encoder": text_encoder}
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(param_groups(modules, cfg), lr=cfg.lr, betas=(0.9, 0.99), fused=dev.type == "cuda")
    step, log, origin = 0, [], "scratch"
    ckpt = Path(cfg.ckpt) if cfg.ckpt else None
    if cfg.resume and ckpt is not None and ckpt.is_file():
        ck = torch.load(ckpt, map_location=dev, weights_only=False)
        for name, m in modules.items():
            m.load_state_dict(ck["model"][name])
        if len(ck["opt"]["param_groups"]) != len(opt.param_groups):
            was = ck.get("qk_norm_lr_mult", "not 1" if len(ck["opt"]["param_groups"]) == 3 else 1.0)
            raise ValueError(f"checkpoint {ckpt} was trained with qk_norm_lr_mult={was} ("
                             f"{len(ck['opt']['param_groups'])} optimizer groups), this run has "
                             f"{cfg.qk_norm_lr_mult} ({len(opt.param_groups)}): pass the checkpoint's "
                             "--qk-norm-lr-mult to resume it, or --no-resume to start from --init-from")
        opt.load_state_dict(ck["opt"])
        ema = EMA(modules, cfg.ema_decay)
        ema.load(ck["ema"], ck["ema_n"])
        step, log, origin = ck["step"], ck["log"], f"checkpoint {ckpt}"
    elif cfg.init_from:
        tf_state, _, te_state, _ = load_testbed_state(cfg.init_from)
        transformer.load_state_dict(tf_state)
        text_encoder.load_state_dict(te_state)
        meta_file = Path(cfg.init_from) / "training_meta.json"
        meta_prev = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        step = int(meta_prev.get("steps", 0))
        log = read_log(Path(cfg.init_from) / LOG_NAME)
        scale_self_attention_qk_norm(transformer, cfg.qk_norm_init_scale)
        ema = EMA(modules, cfg.ema_decay, n=step)
        origin = f"weights {cfg.init_from} (step {step})"
    else:
        ema = EMA(modules, cfg.ema_decay)
    n_params = sum(p.numel() for p in transformer.parameters())
    print(f"testbed: {n_params / 1e6:.2f} M transformer parameters on {dev}; from {origin}", flush=True)
    # data and noise streams depend on the global step, so stretches never replay the same clips
    data_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    noise_gen = torch.Generator(device=dev).manual_seed(cfg.seed * 1_000_003 + step + 1)

    start_step = step
    t0 = time.time()
    t_ckpt = t0
    while time.time() - t0 < cfg.time_budget and (cfg.max_steps is None or step < cfg.max_steps):
        ts = time.time()
        x0, ids, mask, t, (h, w, f, bs) = _batch(cfg, buckets, data_gen, tok, dev)
        noise = torch.randn(x0.shape, generator=noise_gen, device=dev)
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        for gr in opt.param_groups:
            gr["lr"] = lr * gr.get("lr_mult", 1.0)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            text = text_encoder(ids, mask)
            loss = flow_matching_loss(transformer, x0, text, t, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        step += 1
        rec = {"step": step, "loss": round(float(loss.detach()), 5), "gnorm": round(float(gnorm), 4),
               "lr": lr, "size": [f, h, w], "batch": bs, "ms": round(1000 * (time.time() - ts), 1)}
        if not math.isfinite(rec["loss"]):
            raise FloatingPointError(f"loss is {rec['loss']} at step {step}; lower --lr or check the data")
        log.append(rec)
        if step % 100 == 0 or step - start_step <= 2:
            print(json.dumps(rec), flush=True)
        if ckpt is not None and time.time() - t_ckpt > cfg.checkpoint_every:
            _save_ckpt(ckpt, modules, opt, ema, step, log, cfg)
            t_ckpt = time.time()
    elapsed = time.time() - t0
    if ckpt is not None:
        _save_ckpt(ckpt, modules, opt, ema, step, log, cfg)
    meta = {"steps": step, "transformer_config": tf_cfg, "text_encoder_config": te_cfg,
            "transformer_params": n_params, "buckets": buckets, "train_config": asdict(cfg),
            "clips_seen": sum(r["batch"] for r in log)}
    weights_dir = out / "weights"
    save_testbed(ema.part("transformer"), ema.part("text_encoder"), tok, weights_dir, tf_cfg, te_cfg, meta)
    _write_log(log, weights_dir / LOG_NAME)
    recent = [r["loss"] for r in log[-200:]]
    summary = {"from": origin, "start_step": start_step, "end_step": step, "seconds": round(elapsed, 1),
               "ms_per_step": round(1000 * elapsed / max(step - start_step, 1), 1),
               "mean_loss_last_200": sum(recent) / max(len(recent), 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("summary " + json.dumps(summary), flush=True)
    return summary


def _save_ckpt(path: Path, modules, opt, ema: EMA, step: int, log: list[dict], cfg: TrainConfig) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": {n: m.state_dict() for n, m in modules.items()}, "opt": opt.state_dict(),
                "ema": ema.shadow, "ema_n": ema.n, "step": step, "log": log,
                "qk_norm_lr_mult": cfg.qk_norm_lr_mult}, tmp)
    tmp.replace(path)


def plot_loss(log: list[dict], path: str | Path) -> Path:
    """Per-step loss and its moving mean (log scale) over the whole accumulated log."""
    from svg2.mini.train import plot_loss as _plot

    return _plot(log, path, title="testbed training loss")
