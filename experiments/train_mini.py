"""Train the mini text-to-video model (``svg2.mini.train``) on procedurally rendered clips.

    python experiments/train_mini.py --out runs/s1 --seed 0 --steps 1471                      # stage 1 (GPU)
    python experiments/train_mini.py --out runs/s2 --init-from runs/s1 --seed 1 --steps 1066 \
        --tokens-per-step 65536 --lr 4e-4 --warmup 50                                        # stage 2
    python experiments/train_mini.py --out runs/s2 --assemble weights/mini                  # ship
    python experiments/train_mini.py --steps 3 --tiny --device cpu --out /tmp/m              # smoke test

Outputs under --out: ``mini_ema-NN.safetensors`` shards (EMA weights in bf16, each < 16 MB, configs in
the metadata; ``--assemble`` turns them into the weights/mini folder), ``train_log.jsonl``, ``loss.png``,
``samples.png``, ``eval.json``. A full resumable checkpoint (weights, EMA, optimizer, step, RNG) goes to
--ckpt; --resume continues from it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from svg2.mini.train import TrainConfig, assemble, train


def main(argv: list[str] | None = None) -> int:
    d = TrainConfig(out="")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (shards, logs, plots)")
    p.add_argument("--steps", type=int, default=d.steps, help="total optimizer steps (LR schedule length)")
    p.add_argument("--auto-steps", action="store_true",
                   help="after 40 steps, set --steps so the run ends within --time-budget (recorded)")
    p.add_argument("--time-budget", type=float, default=d.time_budget, help="seconds of training, hard stop")
    p.add_argument("--tokens-per-step", type=int, default=d.tokens_per_step)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--cfg-dropout", type=float, default=d.cfg_dropout, help="share of null captions")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--tiny", action="store_true", help="tiny model and clips (CPU smoke test)")
    p.add_argument("--ckpt", default=None, help="full resumable checkpoint path")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--init-from", default=None,
                   help="folder of mini_ema-*.safetensors shards to start from (a continuation stage)")
    p.add_argument("--export-every", type=float, default=d.export_every, help="seconds between EMA exports")
    p.add_argument("--eval-prompts", type=int, default=d.eval_prompts,
                   help="held-out eval prompts per triple (0: skip)")
    p.add_argument("--samples", type=int, default=d.samples, help="write samples.png (0: skip)")
    p.add_argument("--structure", type=int, default=d.structure,
                   help="measure attention structure (1: quick, 2: +long)")
    p.add_argument("--assemble", default=None, help="only turn the shards in --out into a weights folder here")
    a = vars(p.parse_args(argv))
    dest = a.pop("assemble")
    if dest:
        assemble(Path(a["out"]), Path(dest))
        print(f"assembled {dest}")
        return 0
    train(TrainConfig(**a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
