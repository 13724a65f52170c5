#!/usr/bin/env bash
# The GPU measurements to take whenever a GPU is at hand, in one call, each part's output kept in
# $OUT (default out/gpu) even when a later part fails or runs out of time:
#
#     bash benchmarks/gpu.sh                 # train, e2e, sample, lite, in that order
#     bash benchmarks/gpu.sh train e2e       # some of them (a part takes 3 to 6 minutes on an H200:
#                                            # in a 15-minute device session, two parts a call)
#
# train: bench.py --only train --quick (4 x 512: eager with and without the adapters, compiled,
# each with and without gradient checkpointing); e2e: train.py + sample.py --run on LaVIN-7B's
# sizes; sample: decode at batch 1, eager and compiled; lite: LaVIN-7B-lite and 13B-lite, training
# and decoding at 4 bits (and 8 for 7B's decoding): the longest part, up to 10 minutes. Each part
# stops after 420 s (lite: 590 s); PART_SECONDS=N sets every part's limit.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-out/gpu}
mkdir -p "$out"
if [ -z "${BENCH_TMP:-}" ]; then  # e2e writes 13 GB of random weights here; a part cut by timeout
  BENCH_TMP=$(mktemp -d)          # leaves them behind, so the folder goes when the script ends
  trap 'rm -rf "$BENCH_TMP"' EXIT
fi
export BENCH_TMP
limit=${PART_SECONDS:-420}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; python -c \
  "import torch; print('torch', torch.__version__)"; } > "$out/machine.txt" 2>&1
cat "$out/machine.txt"
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(train e2e sample lite)
for part in "${parts[@]}"; do
  case $part in
    train | sample) args=(--only "$part" --quick) ;;
    e2e | lite) args=(--only "$part") ;;
    *) echo "unknown part $part: train, e2e, sample or lite" >&2; exit 2 ;;
  esac
  echo "== python bench.py ${args[*]}" | tee "$out/$part.txt"
  seconds=$limit
  [ "$part" = lite ] && seconds=${PART_SECONDS:-590}
  timeout "$seconds" python bench.py "${args[@]}" 2>&1 | tee -a "$out/$part.txt"
  echo "== exit ${PIPESTATUS[0]}" | tee -a "$out/$part.txt"
done
