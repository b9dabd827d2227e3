#!/usr/bin/env bash
# The method tables of issues 16 and 17 on the testbed model, in one GPU command (one H200): every sweep writes
# into one results store under /tmp/tables (kept between back-to-back commands of a warm machine, and carried
# back in by `carry: [multirun/testbed_tables]` otherwise), each under its own time limit so that a sweep cut
# short still leaves its finished rows, then the report and the rows are packed into $OUT.
#   bash experiments/testbed_tables.sh [seconds for all sweeps, default 420] [sweep names, default: all but oracle]
#   bash experiments/testbed_tables.sh 420 issue17 layout baselines oracle
# Keep the budget 120 s under the command's limit (install, the report, the last sweep's interrupt).
# Relaunching skips finished rows (the store is keyed per row). Quality only: latency here has no warm-up.
# batch_size=32: all 32 (caption, seed) pairs of a job in one pipeline call; at 16 a job took about 33 s, most of
# it host-bound per-call work (k-means, selection) that a larger batch amortises.
set -uo pipefail
budget=${1:-420}; shift || true
wanted=" ${*:-compensation issue17 layout baselines} "
: "${OUT:?set OUT to the folder that comes back}"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
root=/tmp/tables
store=$root/store
mkdir -p "$root"
# A store carried in from an earlier command (cold machine) seeds /tmp.
if [ ! -d "$store" ] && [ -d multirun/testbed_tables/store ]; then cp -r multirun/testbed_tables/store "$store"; fi
end=$(( $(date +%s) + budget ))
common=(model=testbed prompts=testbed prompts.limit=16 'seeds=[0,1]' batch_size=32 store.dir=$store
        store.save_videos=false 'metrics.compare_on=[memory]' latency.warmup_runs=0 report=false)

sweep() {  # sweep <name> <overrides...>: run under the time left
  local name=$1; shift
  case "$wanted" in *" $name "*) ;; *) return ;; esac
  local left=$(( end - $(date +%s) ))
  if [ "$left" -le 20 ]; then echo "[tables] no time left for $name"; return; fi
  echo "[tables] $name ($left s left)"
  # SIGINT lets the harness save the rows in flight; a sweep that still runs 20 s later is killed (a Hydra
  # multirun may start its next job after the interrupt, and the command's own limit would lose the packing).
  timeout --signal=INT --kill-after=20 "$left" svg2-run -m "${common[@]}" name="$name" hydra.sweep.dir="$root/$name" "$@" \
    > "$root/$name.log" 2>&1
  echo "[tables] $name rc=$? $(grep -c ' ok, ' "$root/$name.log") jobs reported"
  grep -E "failed|Error" "$root/$name.log" | grep -v " 0 failed" | tail -3
  pack  # after every sweep: a command cut short by its own limit still returns the rows so far
}

pack() {
  tar -C "$root" -czf "$OUT/tables.tgz" store/results.jsonl store/rows $(cd "$root" && ls -d *.log report 2>/dev/null)
}

sweep compensation method=positional,svg2 method.cfg.compensate=false,true method.cfg.target_density=0.1,0.15,0.25
sweep issue17 method=svg_ear,sol_attn method.cfg.target_density=0.1,0.15,0.25
sweep layout method=svg2 method.cfg.compensate=true method.cfg.target_density=0.15 method.cfg.layout_every=2,4
sweep baselines method=svg1,radial,sliding_tile method.cfg.target_density=0.1,0.15,0.25
sweep oracle method=oracle_raster,oracle_kmeans method.cfg.target_density=0.1,0.15,0.25

svg2-report "$store" --out "$root/report" > "$root/report.log" 2>&1 || echo "[tables] report failed"
pack
ls -la "$OUT"
