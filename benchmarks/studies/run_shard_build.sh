#!/usr/bin/env bash
# The shard-build record: two ImageNet-like photo sets from Debian's photographs,
# one at a natural JPEG quality (95) and one at the quality closest to 110 KB per
# file, each benchmarked against the PIL + ShardWriter baseline.
# usage: benchmarks/studies/run_shard_build.sh SOURCE_PHOTOS_DIR RESULTS_DIR [COUNT] [REPS]
set -euo pipefail
src=${1:?source photos}; results=${2:?results dir}; count=${3:-4000}; reps=${4:-3}
work=$(mktemp -d)
mkdir -p "$results"
for set in q95 110kb; do
  if [ "$set" = q95 ]; then q="--quality 95"; else q="--target-kb 110"; fi
  python3 -m moco_dali.tools.bench.photoset --src "$src" --out "$work/$set" --count "$count" $q
  python3 -m moco_dali.tools.bench.cli shards --photos "$work/$set/photos" --reps "$reps" --out "$results/shard_build-$set.json"
done
rm -rf "$work"
