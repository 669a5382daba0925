#!/usr/bin/env bash
# hh_train.sh - the real-data check of prefrm-train (issue 9): train on the
# three helpful HH-RLHF test files pooled, 80/20 split (split seed 0), a gpt2
# of width 128, 4 layers, 4 heads, context 256, byte tokens, for a fixed
# number of epochs, and report held-out accuracy beside the "longer response
# wins" baseline on the same held-out pairs, wall time, pairs/s and peak
# memory. A benchmark, not a test: never run by CTest.
#
#   tests/bench/hh_train.sh [BUILD_DIR]          (default: build)
#
# Environment: EPOCHS (1), THREADS (1), BATCH (16), LR (1e-4), EXTRA (more
# prefrm-train flags, e.g. "--warmup 50 --schedule cosine"), OUT (a temporary
# folder, removed afterwards unless given), SHARED (<repo>/../shared).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
build=${1:-build}
[[ $build = /* ]] || build=$root/$build
train=$build/tools/prefrm-train
[[ -x $train ]] || { echo "hh_train: $train not built" >&2; exit 1; }
shared=${SHARED:-$root/../shared}
data=$shared/data/hh-rlhf
files=("$data"/helpful-base-test.jsonl "$data"/helpful-online-test.jsonl
       "$data"/helpful-rejection-sampled-test.jsonl)
for f in "${files[@]}"; do
  [[ -f $f ]] || { echo "hh_train: $f not found (needs ../shared)" >&2; exit 1; }
done
# lr 1e-4 (torch_ref's default) and one epoch: on this data the held-out
# loss is lowest after one or two epochs, and later epochs overfit (see
# docs/dev/benchmarks.md, "prefrm-train on real preference data")
epochs=${EPOCHS:-1} threads=${THREADS:-1} batch=${BATCH:-16} lr=${LR:-1e-4}
out=${OUT:-}
if [[ -z $out ]]; then
  out=$(mktemp -d "${TMPDIR:-/tmp}/hh_train.XXXXXX")
  trap 'rm -rf "$out"' EXIT
  out=$out/run
fi

echo "hh_train: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
echo "hh_train: gpt2 128x4x4, ctx 256, bytes, $epochs epochs, batch $batch, lr $lr, $threads thread(s) ${EXTRA:-}"
log=$(mktemp)
OPENBLAS_NUM_THREADS=1 /usr/bin/time -v "$train" --train "${files[@]}" --split 0.8 --split-seed 0 \
  --model gpt2 --dim 128 --layers 4 --heads 4 --ctx 256 --tokenizer bytes --epochs "$epochs" \
  --batch "$batch" --lr "$lr" --threads "$threads" --log-every 100 --overwrite --out "$out" ${EXTRA:-} \
  2> >(tee "$log" >&2)
grep -E 'baseline|Maximum resident' "$log" | sed 's/^\s*/hh_train: /'
/usr/bin/python3 - "$out/summary.json" "$out/metrics.csv" <<'PY'
import csv, json, sys
for r in csv.DictReader(open(sys.argv[2])):  # each epoch's held-out figures
    print("hh_train: epoch %s held-out loss %.4f accuracy %.4f ECE %.4f" % (
        r["epoch"], float(r["heldout_loss"]), float(r["heldout_accuracy"]),
        float(r["heldout_ece"])))
s = json.load(open(sys.argv[1]))
print("hh_train: held-out pairs %d, longer-wins baseline %.4f, best accuracy %.4f (epoch %s), "
      "pairs/s %.1f, wall %.0f s" % (s["heldout_pairs"], s["heldout_longer_wins"],
      s["best_heldout_accuracy"], s["best_epoch"], s["pairs_per_s"], s["wall_time_s"]))
PY
rm -f "$log"
