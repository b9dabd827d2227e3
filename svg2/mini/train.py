"""Training of the mini text-to-video model on procedurally rendered clips (the library side of
``experiments/train_mini.py``).

Reproducible recipe (seeded data, init and noise). Each step draws one size bucket, renders a batch of
clips on the device, and takes a rectified-flow step on the transformer and the text encoder together
(bf16 autocast, AdamW, grad clipping, fp32 EMA). The batch size of a bucket keeps tokens per step about
constant, so short CPU-sized clips and long 8k-token clips are both in distribution.

Outputs under ``cfg.out``: ``mini_ema-NN.safetensors`` shards (EMA weights in bf16, each < 16 MB, configs in
the metadata; :func:`assemble` turns them into the weights/mini folder), ``train_log.jsonl``, ``loss.png``,
``samples.png``, ``eval.json``. A full resumable checkpoint (weights, EMA, optimizer, step, RNG) goes to
``cfg.ckpt``; ``cfg.resume`` continues from it.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from svg2.mini import checker
from svg2.mini.data import captions, render, sample_scenes
from svg2.mini.model import (
    TEXT_ENCODER_CONFIG,
    TRANSFORMER_CONFIG,
    build_transformer,
    flow_matching_loss,
    num_tokens,
    pack,
    sample_t,
)
from svg2.mini.pipeline import MiniPipeline
from svg2.mini.text import CaptionTokenizer, MiniTextEncoder

__all__ = ["TrainConfig", "BUCKETS", "TINY_BUCKETS", "EMA", "export_shards", "assemble", "pipeline_from_state",
           "train"]

# (height = width, frames, weight). Batch size = tokens_per_step // tokens.
BUCKETS = [
    (64, 8, 0.12),
    (64, 16, 0.30),  # the quick operating point
    (64, 24, 0.08),
    (96, 12, 0.10),
    (128, 8, 0.10),
    (128, 16, 0.12),
    (128, 32, 0.18),  # the long operating point (8192 tokens)
]
TINY_BUCKETS = [(64, 4, 0.5), (64, 8, 0.5)]
SHARD_BYTES = 14 * 2**20


@dataclass
class TrainConfig:
    """One training run (``experiments/train_mini.py`` maps its flags onto these fields one to one)."""

    out: str  # output folder (shards, logs, plots)
    steps: int = 4000  # total optimizer steps (LR schedule length)
    auto_steps: bool = False  # after 40 steps, set steps so the run ends within time_budget (recorded)
    time_budget: float = float("inf")  # seconds of training, hard stop
    tokens_per_step: int = 32768
    lr: float = 6e-4
    warmup: int = 150
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1  # share of null captions
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    tiny: bool = False  # tiny model and clips (CPU smoke test)
    ckpt: str | None = None  # full resumable checkpoint path
    resume: bool = False
    init_from: str | None = None  # folder of mini_ema-*.safetensors shards to start from (a continuation stage)
    export_every: float = 90.0  # seconds between EMA exports
    eval_prompts: int = 4  # held-out eval prompts per triple (0: skip)
    samples: int = 1  # write samples.png (0: skip)
    structure: int = 0  # measure attention structure (1: quick, 2: + long)


class EMA:
    """fp32 exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, modules: dict[str, torch.nn.Module], decay: float) -> None:
        self.decay, self.n = decay, 0
        self.shadow = {f"{name}.{k}": v.detach().float().clone()
                       for name, m in modules.items() for k, v in m.state_dict().items()}

    @torch.no_grad()
    def update(self, modules: dict[str, torch.nn.Module]) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        if not hasattr(self, "_pairs"):
            live = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
            self._pairs = [(self.shadow[k], v) for k, v in live.items() if v.dtype.is_floating_point]
        shadows, lives = zip(*self._pairs)
        torch._foreach_lerp_(list(shadows), [v.float() for v in lives], 1 - d)

    def module_state(self, name: str) -> dict[str, torch.Tensor]:
        pre = name + "."
        return {k[len(pre):]: v for k, v in self.shadow.items() if k.startswith(pre)}


def export_shards(ema: EMA, out: Path, meta: dict) -> list[Path]:
    """EMA weights in bf16, split into shards of < 16 MB (configs in each shard's metadata)."""
    tensors = {k: v.to("cpu", torch.bfloat16).contiguous() for k, v in ema.shadow.items()}
    shards: list[dict] = [{}]
    size = 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * 2
        if size + nbytes > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += nbytes
    paths = []
    for old in out.glob("mini_ema-*.safetensors"):
        old.unlink()
    for i, sd in enumerate(shards):
        path = out / f"mini_ema-{i:02d}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(sd, str(tmp), metadata={"meta": json.dumps(meta)})
        os.replace(tmp, path)
        paths.append(path)
    return paths


def assemble(shard_dir: Path, dest: Path) -> MiniPipeline:
    """Build the diffusers-style weights folder (transformer/, text_encoder/, scheduler/) from shards."""
    from safetensors import safe_open

    shards = sorted(shard_dir.glob("mini_ema-*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no mini_ema-*.safetensors in {shard_dir}")
    with safe_open(str(shards[0]), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    state: dict[str, torch.Tensor] = {}
    for s in shards:
        state.update(load_file(str(s)))
    pipe = pipeline_from_state(state, meta)
    pipe.save_pretrained(dest)
    (dest / "training_meta.json").write_text(json.dumps(meta, indent=2))
    return pipe


def pipeline_from_state(state: dict[str, torch.Tensor], meta: dict) -> MiniPipeline:
    tf_cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["transformer_config"].items()}
    transformer = build_transformer(**tf_cfg)
    transformer.load_state_dict({k[len("transformer."):]: v.float() for k, v in state.items()
                                 if k.startswith("transformer.")})
    tok = CaptionTokenizer(meta["vocab"][3:], max_len=meta["text_encoder_config"]["max_len"])
    te = MiniTextEncoder(len(tok), **meta["text_encoder_config"])
    te.load_state_dict({k[len("text_encoder."):]: v.float() for k, v in state.items()
                        if k.startswith("text_encoder.")})
    return MiniPipeline(transformer.eval(), te.eval(), tok)


def plot_loss(log: list[dict], path: str | Path, title: str = "mini text-to-video training loss") -> Path:
    """Per-step loss and its moving mean (log scale) over the whole log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["step"] for r in log])
    loss = np.array([r["loss"] for r in log])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, lw=0.4, alpha=0.35, label="per step")
    w = max(1, len(loss) // 50)
    if len(loss) >= w:
        ma = np.convolve(loss, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], ma, lw=1.5, label=f"moving mean ({w})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching MSE")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_samples(pipe: MiniPipeline, path: Path, prompts: list[str], sizes: list[tuple[int, int, int]]) -> None:
    """One row per prompt: 6 frames spread over the clip, all rows scaled to 128 pixels high."""
    import imageio.v2 as imageio

    rows = []
    for (f, h, w), prompt in zip(sizes, prompts):
        v = pipe(prompt, num_frames=f, height=h, width=w, generator=torch.Generator().manual_seed(0)).frames[0]
        idx = np.linspace(0, f - 1, 6).round().astype(int)
        row = np.concatenate([v[i] for i in idx], 1)
        rep = 128 // h
        rows.append(np.kron(row, np.ones((rep, rep, 1))) if rep > 1 else row)
    imageio.imwrite(path, (np.concatenate(rows, 0) * 255).round().astype(np.uint8))


def train(cfg: TrainConfig) -> dict:
    """Train (or resume) per ``cfg``, export the EMA shards, then sample and score the EMA weights.
    Returns what ``eval.json`` holds."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    steps_total = cfg.steps  # auto_steps may change it; cfg stays as the caller gave it
    dev = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    tf_cfg = dict(TRANSFORMER_CONFIG)
    te_cfg = dict(TEXT_ENCODER_CONFIG)
    buckets = BUCKETS
    if cfg.tiny:
        tf_cfg.update(num_layers=2, num_attention_heads=2, ffn_dim=256, text_dim=64)
        te_cfg.update(dim=64, num_layers=1, num_heads=2, ffn_dim=128)
        buckets = TINY_BUCKETS
    tok = CaptionTokenizer(max_len=te_cfg["max_len"])
    transformer = build_transformer(**tf_cfg).to(dev).train()
    text_encoder = MiniTextEncoder(len(tok), **te_cfg).to(dev).train()
    modules = {"transformer": transformer, "text_encoder": text_encoder}
    params = [p for m in modules.values() for p in m.parameters()]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99),
                            fused=dev.type == "cuda")
    if cfg.init_from:
        state = {}
        for shard in sorted(Path(cfg.init_from).glob("mini_ema-*.safetensors")):
            state.update(load_file(str(shard)))
        if not state:
            raise FileNotFoundError(f"--init-from {cfg.init_from}: no mini_ema-*.safetensors there")
        for name, m in modules.items():
            pre = name + "."
            m.load_state_dict({k[len(pre):]: v.float() for k, v in state.items() if k.startswith(pre)})
        print(f"initialised from {cfg.init_from}", flush=True)
    ema = EMA(modules, cfg.ema_decay)
    n_params = sum(p.numel() for p in params)
    meta = {"transformer_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in tf_cfg.items()},
            "text_encoder_config": te_cfg, "vocab": tok.vocab, "args": asdict(cfg), "buckets": buckets,
            "params": n_params}
    print(f"params {n_params / 1e6:.2f} M ({n_params * 2 / 2**20:.1f} MiB in bf16) on {dev}", flush=True)

    data_gen = torch.Generator().manual_seed(cfg.seed)
    # Gaussian noise is drawn on the device: on the CPU it cost a third of each step.
    noise_gen = torch.Generator(device=dev).manual_seed(cfg.seed + 1)
    log: list[dict] = []
    step = 0
    if cfg.resume and cfg.ckpt and Path(cfg.ckpt).is_file():
        ck = torch.load(cfg.ckpt, map_location=dev, weights_only=False)
        for name, m in modules.items():
            m.load_state_dict(ck["model"][name])
        opt.load_state_dict(ck["opt"])
        ema.shadow, ema.n = {k: v.to(dev) for k, v in ck["ema"].items()}, ck["ema_n"]
        data_gen.set_state(ck["data_rng"])
        noise_gen.set_state(ck["noise_rng"].cpu() if dev.type == "cpu" else ck["noise_rng"])
        step, log = ck["step"], ck["log"]
        if cfg.auto_steps:
            steps_total = ck["steps"]
        print(f"resumed from {cfg.ckpt} at step {step}", flush=True)

    weights = torch.tensor([b[2] for b in buckets])
    t_start = time.time()
    t_last_export = t_start
    train_time = 0.0
    t_ten = 0.0
    while step < steps_total:
        t0 = time.time()
        bi = int(torch.multinomial(weights, 1, generator=data_gen))
        size, frames, _ = buckets[bi]
        tokens = num_tokens(frames, size, size)
        bs = max(1, cfg.tokens_per_step // tokens)
        scene = sample_scenes(bs, data_gen)
        caps = captions(scene)
        drop = torch.rand(bs, generator=data_gen) < cfg.cfg_dropout
        caps = ["" if d else c for c, d in zip(caps, drop.tolist())]
        ids, mask = tok(caps)
        t = sample_t(bs, data_gen)
        noise = torch.randn((bs, 48, frames, size // 4, size // 4), generator=noise_gen, device=dev)
        with torch.no_grad():
            x0 = pack(render(scene, frames, size, size, device=dev))
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(steps_total, 1))))
        for gr in opt.param_groups:
            gr["lr"] = lr
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            text = text_encoder(ids.to(dev), mask.to(dev))
            loss = flow_matching_loss(transformer, x0, text, t.to(dev), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(modules)
        step += 1
        rec = {"step": step, "loss": float(loss.detach()), "gnorm": float(gnorm), "lr": lr, "bucket": bi,
               "tokens": tokens, "batch": bs}
        log.append(rec)
        train_time += time.time() - t0
        rec["time"] = round(train_time, 2)
        if step % 50 == 0 or step <= 3:
            print(json.dumps(rec), flush=True)
        if step == 10:
            t_ten = train_time
        if cfg.auto_steps and step == 40 and math.isfinite(cfg.time_budget):
            per_step = (train_time - t_ten) / 30  # steps 11-40: past the one-off warm-up costs
            steps_total = max(step + 1, step + int((cfg.time_budget - (time.time() - t_start)) / per_step))
            meta["auto_steps"] = {"measured_s_per_step_first_40": per_step, "steps": steps_total}
            print(f"auto-steps: {per_step * 1000:.1f} ms/step -> --steps {steps_total}", flush=True)
        if time.time() - t_last_export > cfg.export_every:
            meta.update(step=step, train_time_s=train_time)
            export_shards(ema, out, meta)
            (out / "train_log.jsonl").write_text("\n".join(json.dumps(r) for r in log) + "\n")
            t_last_export = time.time()
        if time.time() - t_start > cfg.time_budget:
            print(f"time budget reached at step {step}", flush=True)
            break

    meta.update(step=step, train_time_s=train_time, final_loss_mean_last_200=float(
        np.mean([r["loss"] for r in log[-200:]])))
    export_shards(ema, out, meta)
    (out / "train_log.jsonl").write_text("\n".join(json.dumps(r) for r in log) + "\n")
    plot_loss(log, out / "loss.png")
    if cfg.ckpt:
        torch.save({"model": {n: m.state_dict() for n, m in modules.items()}, "opt": opt.state_dict(),
                    "ema": ema.shadow, "ema_n": ema.n, "data_rng": data_gen.get_state(),
                    "noise_rng": noise_gen.get_state(), "step": step,
                    "log": log, "steps": steps_total}, cfg.ckpt)
    print(f"trained {step} steps in {train_time:.0f} s; mean loss of last 200: "
          f"{meta['final_loss_mean_last_200']:.4f}", flush=True)

    # -- samples and a quick adherence check with the EMA weights ---------------------------------
    pipe = pipeline_from_state(copy.deepcopy(ema.shadow), meta).to(dev)
    if dev.type == "cuda":
        pipe.to(dtype=torch.bfloat16)
    small = buckets[0][0]
    prompts = ["a red circle moves right over a flat blue background",
               "a big yellow square rotates and a small cyan triangle moves up over a striped gray background",
               "a white cross bounces over a noisy brown background while the camera pans left",
               "a green triangle grows and an orange circle moves left over a gradient purple background"]
    sizes = [(16, small, small)] * 3 + [(32 if not cfg.tiny else 8, 2 * small, 2 * small)]
    if cfg.tiny:
        sizes = [(4, 64, 64)] * 4
        pipe.defaults.update(num_inference_steps=2)
    if cfg.samples:
        save_samples(pipe, out / "samples.png", prompts, sizes)
    result = {"meta": {k: v for k, v in meta.items() if k != "vocab"}}
    if cfg.eval_prompts > 0:
        for held in (True, False):
            eps = checker.eval_prompts(cfg.eval_prompts, held_out=held)
            f, h = (4, 64) if cfg.tiny else (16, 64)
            vids = []
            for i in range(0, len(eps), 16):
                chunk = eps[i:i + 16]
                vids.append(pipe([p.prompt for p in chunk], num_frames=f, height=h, width=h,
                                 generator=torch.Generator().manual_seed(i)).frames)
            sc = checker.score(eps, np.concatenate(vids))
            key = "held_out" if held else "seen"
            result[key] = {k: v for k, v in sc.items() if k != "rows"}
            print(f"adherence ({key}, {sc['n']} prompts, quick, {pipe.dtype}): colour {sc['color_acc']:.2f} "
                  f"direction {sc['direction_acc']:.2f}", flush=True)
    if cfg.structure:
        from svg2.mini.structure import measure_top_mass

        points = [("quick", (16, 64))] + ([("long", (32, 128))] if cfg.structure > 1 else [])
        fresh = MiniPipeline(build_transformer(**tf_cfg).eval(), pipe.text_encoder, tok).to(
            dev, pipe.dtype).transformer
        for name, (f, h) in points:
            f, h = (4, 64) if cfg.tiny else (f, h)
            for label, tr in (("trained", pipe.transformer), ("random_init", fresh)):
                trained_tr = pipe.transformer
                pipe.transformer = tr
                try:
                    r = measure_top_mass(pipe, prompts[:1], num_frames=f, height=h, width=h)
                finally:
                    pipe.transformer = trained_tr
                result.setdefault("structure", {}).setdefault(name, {})[label] = r
                print(f"attention top-15% mass ({name}, {label}): mean {r['mean']:.3f} per layer "
                      f"{[round(v, 3) for v in r['per_layer'].values()]}", flush=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2, default=str))
    return result
