"""Train the testbed model in budgeted stretches (see ``svg2.testbed.train``).

    # on the GPU: first command of a stretch (resumes /tmp/testbed/ckpt.pt if a previous command left it,
    # else continues from the committed weights), stops by itself after --time-budget seconds
    python experiments/train_testbed.py --out $OUT/run --ckpt /tmp/testbed/ckpt.pt --init-from weights/testbed \
        --time-budget 480
    python experiments/train_testbed.py --out /tmp/m --device cpu --tiny --max-steps 3     # smoke test

Writes ``--out/weights/`` (the weights folder, 8-bit matrices, with the accumulated log) and
``--out/summary.json``. Exits non-zero on failure (a NaN loss included).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from svg2.testbed.train import TrainConfig, train


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt", default=None, help="full checkpoint (weights, EMA, optimizer); resumed if present")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing --ckpt")
    p.add_argument("--init-from", default=None, help="weights folder to continue from when no --ckpt exists")
    p.add_argument("--time-budget", type=float, default=480.0, help="seconds of training in this command")
    p.add_argument("--max-steps", type=int, default=None, help="stop at this global step")
    p.add_argument("--tokens-per-step", type=int, default=65536)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world-detail", type=float, default=0.0,
                   help="data variant in [0, 1]: token-scale world texture (svg2.testbed.data.render); 0 = original")
    p.add_argument("--qk-norm-lr-mult", type=float, default=1.0,
                   help="LR multiplier of the self-attention qk-norm weights (the logit scale); 1 = original, "
                        "0 = frozen")
    p.add_argument("--qk-norm-init-scale", type=float, default=1.0,
                   help="multiply the self-attention qk-norm weights by this when starting from --init-from "
                        "(logits x scale^2); 1 = original")
    p.add_argument("--ema-decay", type=float, default=0.9995,
                   help="EMA decay of the exported weights (0.998 makes a short A/B run's export its own)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny model and clips (CPU smoke test)")
    a = p.parse_args(argv)
    init = a.init_from
    if init is not None and not (Path(init) / "transformer").is_dir():
        print(f"--init-from {init}: no weights there, starting from scratch", flush=True)
        init = None
    cfg = TrainConfig(out=a.out, ckpt=a.ckpt, resume=not a.no_resume, init_from=init, time_budget=a.time_budget,
                      max_steps=a.max_steps, tokens_per_step=a.tokens_per_step, lr=a.lr, warmup=a.warmup,
                      seed=a.seed, device=a.device, tiny=a.tiny,
                      world_detail=a.world_detail, qk_norm_lr_mult=a.qk_norm_lr_mult,
                      qk_norm_init_scale=a.qk_norm_init_scale, ema_decay=a.ema_decay)
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
