"""Scale-out: one video on several GPUs (Ulysses sequence parallelism through diffusers'
context parallelism, ``ulysses``) and many videos on several GPUs or nodes (prompt sharding, ``sharding``;
SLURM through Hydra's submitit launcher, ``conf/launcher/slurm.yaml``)."""

from svg2.parallel.dist import DistInfo, barrier, dist_info, init_distributed, is_main_process
from svg2.parallel.launch import run_on_ranks
from svg2.parallel.sharding import finish, merge_stores, my_rows, pending_keys, shard_keys
from svg2.parallel.ulysses import (
    check_ulysses_support,
    enable_ulysses,
    gather_rank_records,
    per_rank_summary,
    ulysses_attention,
    ulysses_group,
)

__all__ = [
    "DistInfo", "dist_info", "init_distributed", "is_main_process", "barrier", "run_on_ranks",
    "shard_keys", "pending_keys", "my_rows", "finish", "merge_stores",
    "enable_ulysses", "check_ulysses_support", "ulysses_group", "ulysses_attention", "gather_rank_records",
    "per_rank_summary",
]
