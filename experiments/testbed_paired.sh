#!/usr/bin/env bash
# Paired differences of the testbed method table (results/testbed/method_table/paired.md), one section per
# comparison. A row of the table is one configuration; a pair is the same (caption, seed) under two of them,
# both compared with the same dense video, so the spread of a difference excludes the caption-to-caption spread.
#   bash experiments/testbed_paired.sh [rows, default results/testbed/method_table/results.jsonl.gz] > paired.md
# min_kc_ratio / layout_every are "none" on rows that kept the preset's value (0.1 / 1).
set -euo pipefail
rows=${1:-results/testbed/method_table/results.jsonl.gz}
M=target_density,min_kc_ratio,layout_every
comparisons=(
  "--vary compensate --values true,false --match method,$M"
  "--vary compensate --values true,none --match method,target_density --where-first min_kc_ratio=0.05 --where-second min_kc_ratio=0.05"
  "--vary method --values svg2,positional --match compensate,target_density --where-first min_kc_ratio=none,layout_every=none"
  "--vary method --values svg2,positional --match compensate,target_density --where-first min_kc_ratio=0.05"
  "--vary method --values svg_ear,svg2 --match $M --where-second compensate=true"
  "--vary method --values svg_ear,svg2 --match target_density --where-second compensate=true,min_kc_ratio=0.05"
  "--vary method --values svg2,svg1 --match $M --where-first compensate=true"
  "--vary method --values svg2,sliding_tile --match $M --where-first compensate=true"
  "--vary method --values sol_attn,positional --match target_density --where-second compensate=true"
  "--vary method --values oracle_kmeans,svg2 --match $M --where-second compensate=false"
  "--vary method --values oracle_kmeans,svg2 --match $M --where-second compensate=true"
  "--vary method --values oracle_kmeans,oracle_raster --match $M"
  "--vary layout_every --values 2,none --match method,target_density,compensate,min_kc_ratio"
  "--vary layout_every --values 4,none --match method,target_density,compensate,min_kc_ratio"
)
echo "# Paired differences on the testbed method table"
echo
echo "Rows: \`$rows\`. Written by \`bash experiments/testbed_paired.sh\`; each section is"
echo "\`python -m analysis.paired $rows <args>\`: difference = first - second, mean with a 95% t-interval over the"
echo "(caption, seed) pairs, and how many pairs favour the first. \"none\": the preset's value (min_kc_ratio 0.1, layout_every 1)."
for c in "${comparisons[@]}"; do
  echo; echo "## \`$c\`"; echo
  # shellcheck disable=SC2086  # each comparison is a list of arguments
  python -m analysis.paired "$rows" $c
done
