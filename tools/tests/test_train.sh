#!/usr/bin/env bash
# test_train.sh - prefrm-train end to end on a synthetic preference set.
#
# The data: short prompts ("tell me about tea") and two responses that share
# their filler words; the chosen one has a polite word where the rejected one
# has a rude word, at a random position. A byte n-gram linear model and a
# one-block GPT-2 both learn it within seconds.
#
# Checks: held-out accuracy clearly above chance (linear, gpt2, llama); the
# files of a run (best.safetensors + best.json, metrics.csv with a row per
# epoch, a parseable summary.json); --resume bit-exact after an interruption
# at an epoch's end, mid-epoch, with two threads and after --time-budget;
# bad lines (skip: counted; fail: exit 3 naming FILE:LINE); empty input;
# --eval files; --split determinism; --time-budget; SIGTERM; refusing to
# overwrite a run or to resume with other settings; --help.
#
# Environment (tools/tests/CMakeLists.txt): PREFRM_TRAIN, PFT_TEST_TMPDIR.
# Exit 77: skipped.
set -u

P=${PREFRM_TRAIN:-}
if [ -z "$P" ] || [ ! -x "$P" ]; then
  echo "SKIP: prefrm-train not built (PREFRM_TRAIN='$P')"
  exit 77
fi
T=${PFT_TEST_TMPDIR:-${TMPDIR:-/tmp}}/test_train.$$
rm -rf "$T"
mkdir -p "$T" || exit 1
trap 'rm -rf "$T"' EXIT
cd "$T" || exit 1
export OPENBLAS_NUM_THREADS=1 # the test's --threads 2 must not oversubscribe

failures=0
fail() {
  echo "FAIL: $*"
  failures=$((failures + 1))
}
ok() { echo "ok - $*"; }
start=$SECONDS

# A JSON field of a file, with jq, python3, or (flat numbers only) grep.
jget() {
  if command -v jq >/dev/null; then
    jq -r ".$2" "$1"
  elif command -v python3 >/dev/null; then
    python3 -c 'import json,sys; v=json.load(open(sys.argv[1]))[sys.argv[2]]; print("null" if v is None else str(v).lower() if isinstance(v,bool) else v)' "$1" "$2"
  else
    grep -o "\"$2\": *[^,}]*" "$1" | head -1 | sed 's/.*: *//; s/"//g'
  fi
}
json_ok() {
  if command -v jq >/dev/null; then
    jq . "$1" >/dev/null 2>&1
  elif command -v python3 >/dev/null; then
    python3 -c 'import json,sys; json.load(open(sys.argv[1]))' "$1" 2>/dev/null
  else
    grep -q '"finished"' "$1"
  fi
}
# The held-out accuracy of the last epoch line of a stdout file.
last_accuracy() { grep '^epoch ' "$1" | tail -1 | sed 's/.* accuracy \([0-9.]*\).*/\1/'; }
above() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a + 0 > b + 0) }'; }

# ---- data ----------------------------------------------------------------------------------------
cat >gen.awk <<'EOF'
BEGIN {
  srand(seed);
  nf = split("the a it is we can do this that here now some more time way one", filler, " ");
  np = split("please thanks gladly kindly sorry", polite, " ");
  nr = split("whatever ugh stupid dumb shut", rude, " ");
  nt = split("cats maps code tea rain jazz", topic, " ");
  for (i = 0; i < n; i++) {
    t = topic[int(rand() * nt) + 1];
    k = 2 + int(rand() * 4);
    pos = int(rand() * (k + 1));
    c = ""; r = "";
    for (j = 0; j <= k; j++) {
      if (j == pos) { w1 = polite[int(rand() * np) + 1]; w2 = rude[int(rand() * nr) + 1]; }
      else { w1 = filler[int(rand() * nf) + 1]; w2 = w1; }
      c = c (j ? " " : "") w1;
      r = r (j ? " " : "") w2;
    }
    printf("{\"prompt\": \"tell me about %s\", \"chosen\": \"%s\", \"rejected\": \"%s\"}\n", t, c, r);
  }
}
EOF
awk -v n=1000 -v seed=1 -f gen.awk >train.jsonl
awk -v n=200 -v seed=2 -f gen.awk >eval.jsonl
[ "$(wc -l <train.jsonl)" -eq 1000 ] || {
  echo "FAIL: awk did not write the data"
  exit 1
}
TINY="--model gpt2 --dim 32 --layers 1 --heads 2 --ctx 64"

# ---- --help --------------------------------------------------------------------------------------
if "$P" --help >help.txt; then
  missing=""
  for f in --train --eval --split --split-seed --model --epochs --out --time-budget --batch --lr \
    --warmup --schedule --weight-decay --clip --seed --threads --train-blocks --init --resume \
    --tokenizer --max-len --features --hidden --log-every --on-bad-line --dim --layers --heads \
    --kv-heads --ctx; do
    grep -q -- "$f" help.txt || missing="$missing $f"
  done
  grep -q "Exit codes" help.txt || missing="$missing (exit codes)"
  grep -q "Examples" help.txt || missing="$missing (examples)"
  grep -q "summary.json" help.txt || missing="$missing (files)"
  [ -z "$missing" ] && ok "--help" || fail "--help lacks:$missing"
else
  fail "--help exits non-zero"
fi
"$P" --no-such-flag >/dev/null 2>&1
[ $? -eq 2 ] && ok "unknown option: exit 2" || fail "unknown option does not exit 2"

# ---- linear over n-grams, --eval files, the files of a run ------------------------------------------
"$P" --train train.jsonl --eval eval.jsonl --model linear --epochs 2 --out lin >lin.out 2>lin.err
rc=$?
acc=$(last_accuracy lin.out)
if [ $rc -ne 0 ]; then
  fail "linear run: exit $rc: $(tail -3 lin.err)"
elif above "$acc" 0.9; then
  ok "linear: held-out accuracy $acc"
else
  fail "linear: held-out accuracy $acc (expected > 0.9)"
fi
for f in best.safetensors best.json last.safetensors last.json last.optim.safetensors state.json \
  metrics.csv summary.json; do
  [ -s "lin/$f" ] || fail "linear: lin/$f missing"
done
grep -q '"ngrams"' lin/best.json || fail "linear: best.json does not say ngrams"
[ "$(wc -l <lin/metrics.csv)" -eq 3 ] || fail "linear: metrics.csv has $(wc -l <lin/metrics.csv) lines, not header + 2"
head -1 lin/metrics.csv | grep -q '^epoch,step,.*heldout_accuracy.*heldout_ece.*elapsed_s$' ||
  fail "linear: metrics.csv header: $(head -1 lin/metrics.csv)"
[ "$(grep -c '^epoch ' lin.out)" -eq 2 ] || fail "linear: not one line per epoch"
grep '^epoch ' lin.out | tail -1 | grep -q 'heldout_loss .* brier .* ece ' ||
  fail "linear: epoch line lacks statistics"
if json_ok lin/summary.json; then
  [ "$(jget lin/summary.json heldout_pairs)" = 200 ] || fail "--eval: heldout_pairs != 200"
  [ "$(jget lin/summary.json train_pairs)" = 1000 ] || fail "--eval: train_pairs != 1000"
  [ "$(jget lin/summary.json finished)" = true ] || fail "summary: not finished"
  for k in best_epoch best_heldout_loss best_heldout_accuracy pairs_seen wall_time_s pairs_per_s \
    peak_rss_bytes skipped_lines; do
    v=$(jget lin/summary.json $k)
    [ -n "$v" ] && [ "$v" != null ] || fail "summary.json: $k missing"
  done
  ok "files of a run; summary.json parses"
else
  fail "summary.json does not parse"
fi

# ---- gpt2 (tiny) and llama on bytes, --split --------------------------------------------------------
"$P" --train train.jsonl --split 0.8 $TINY --epochs 2 --out g >g.out 2>g.err
rc=$?
acc=$(last_accuracy g.out)
if [ $rc -ne 0 ]; then
  fail "gpt2 run: exit $rc: $(tail -3 g.err)"
elif above "$acc" 0.8; then
  ok "gpt2 (32 wide, 1 block): held-out accuracy $acc"
else
  fail "gpt2: held-out accuracy $acc (expected > 0.8)"
fi
grep -q '"tokens"' g/best.json && grep -q '"bytes"' g/best.json || fail "gpt2: best.json: $(cat g/best.json)"
[ "$(jget g/summary.json heldout_pairs)" = 200 ] || fail "--split 0.8 of 1000: heldout_pairs != 200"
"$P" --train train.jsonl --model llama --dim 32 --layers 1 --heads 4 --kv-heads 2 --ctx 64 \
  --epochs 1 --out ll >ll.out 2>ll.err
acc=$(last_accuracy ll.out)
above "$acc" 0.8 && ok "llama: held-out accuracy $acc" || fail "llama: accuracy '$acc': $(tail -2 ll.err)"

# ---- --split determinism ----------------------------------------------------------------------------
"$P" --train train.jsonl --split 0.8 $TINY --epochs 2 --out g2 >/dev/null 2>&1
"$P" --train train.jsonl --split 0.8 --split-seed 5 $TINY --epochs 2 --out g3 >/dev/null 2>&1
if cmp -s g/best.safetensors g2/best.safetensors && ! cmp -s g/last.safetensors g3/last.safetensors; then
  ok "--split: same seed, same run; another --split-seed, another held-out set"
else
  fail "--split determinism"
fi

# ---- --resume is bit-exact ----------------------------------------------------------------------------
RUN="--train train.jsonl $TINY --epochs 3 --schedule cosine --warmup 5 --weight-decay 0.01 --log-every 1000"
"$P" $RUN --out full >/dev/null 2>&1 || fail "resume: the uninterrupted run failed"
spe=$(jget full/state.json steps_per_epoch)
"$P" $RUN --out cut1 --stop-after "$spe" >/dev/null 2>&1
r1=$?
[ "$(jget cut1/state.json epoch)" = 1 ] && [ "$(jget cut1/state.json step_in_epoch)" = 0 ] ||
  fail "resume: --stop-after $spe did not stop after epoch 1"
"$P" --resume --out cut1 >cut1.out 2>cut1.err
r2=$?
if [ $r1 -eq 0 ] && [ $r2 -eq 0 ] && cmp -s full/last.safetensors cut1/last.safetensors &&
  cmp -s full/best.safetensors cut1/best.safetensors &&
  cmp -s full/last.optim.safetensors cut1/last.optim.safetensors; then
  ok "--resume after epoch 1: the same model, best model and optimizer bytes"
else
  fail "--resume after epoch 1 differs (exits $r1, $r2): $(tail -2 cut1.err)"
fi
[ "$(grep -c '^epoch ' cut1.out)" -eq 2 ] || fail "resume: expected epochs 2 and 3 only"
cmp -s <(cut -d, -f1-17 full/metrics.csv) <(cut -d, -f1-17 cut1/metrics.csv) ||
  fail "resume: metrics.csv differs from the uninterrupted run's"
# Mid-epoch, twice, the same command line repeated.
"$P" $RUN --out cut2 --stop-after $((spe / 2)) >/dev/null 2>&1
"$P" $RUN --out cut2 --resume --stop-after $((spe + 3)) >/dev/null 2>&1
"$P" $RUN --out cut2 --resume >/dev/null 2>&1
cmp -s full/last.safetensors cut2/last.safetensors && ok "--resume mid-epoch, twice: same bytes" ||
  fail "--resume mid-epoch differs"
# Two threads: deterministic, and resumable.
"$P" $RUN --threads 2 --out th >/dev/null 2>&1
"$P" $RUN --threads 2 --out th2 >/dev/null 2>&1
"$P" $RUN --threads 2 --out thc --stop-after 7 >/dev/null 2>&1
"$P" --resume --out thc >/dev/null 2>&1
if cmp -s th/last.safetensors th2/last.safetensors && cmp -s th/last.safetensors thc/last.safetensors; then
  ok "--threads 2: runs repeat bit for bit, also across --resume"
else
  fail "--threads 2 is not deterministic or not resumable"
fi
# Other settings are refused; an existing run is not overwritten.
"$P" --resume --out cut1 --lr 0.5 >/dev/null 2>cut.err
[ $? -eq 2 ] && grep -q -- "--lr" cut.err && ok "--resume refuses a changed --lr" ||
  fail "--resume accepted a changed --lr"
"$P" $RUN --out full >/dev/null 2>ow.err
[ $? -eq 2 ] && ok "a run is not overwritten without --overwrite" || fail "an existing run was overwritten"

# ---- --time-budget and SIGTERM ------------------------------------------------------------------------
t0=$SECONDS
"$P" --train train.jsonl $TINY --epochs 10000 --time-budget 2 --out tb >/dev/null 2>tb.err
rc=$?
dt=$((SECONDS - t0))
if [ $rc -eq 0 ] && [ $dt -lt 20 ] && [ "$(jget tb/summary.json stop_reason)" = time-budget ] &&
  [ "$(jget tb/summary.json finished)" = false ] && [ -s tb/state.json ]; then
  ok "--time-budget 2 stops cleanly after ${dt}s, resumable"
else
  fail "--time-budget: exit $rc after ${dt}s: $(tail -2 tb.err)"
fi
s1=$(jget tb/state.json global_step)
"$P" --resume --out tb --time-budget 1 >/dev/null 2>&1
s2=$(jget tb/state.json global_step)
[ "$s2" -gt "$s1" ] 2>/dev/null && ok "--resume continues a stopped run ($s1 -> $s2 steps)" ||
  fail "--resume after --time-budget: steps $s1 -> $s2"
"$P" --train train.jsonl $TINY --epochs 10000 --out sig >/dev/null 2>sig.err &
pid=$!
# metrics.csv appears once the handlers are in place (and before training).
for _ in $(seq 100); do
  [ -e sig/metrics.csv ] && break
  sleep 0.1
done
sleep 0.5
kill -TERM $pid
wait $pid
rc=$?
[ $rc -eq 143 ] && [ "$(jget sig/summary.json stop_reason)" = signal ] && [ -s sig/state.json ] &&
  ok "SIGTERM: saved, exit 143" || fail "SIGTERM: exit $rc: $(tail -2 sig.err)"

# ---- bad lines and empty input ------------------------------------------------------------------------
head -40 train.jsonl >bad.jsonl
cat >>bad.jsonl <<'EOF'
{"prompt": "x", "chosen": "a", "rejected":
{"prompt": "x", "chosen": "a"}
{"prompt": "x", "chosen": 5, "rejected": "b"}
{"prompt": "x", "chosen": "", "rejected": "b"}

{"prompt": "x", "chosen": "a", "rejected": "b", "label": 2}
EOF
sed -n 41,80p train.jsonl >>bad.jsonl
"$P" --train bad.jsonl --model linear --epochs 1 --out bad >/dev/null 2>bad.err
rc=$?
if [ $rc -eq 0 ] && [ "$(jget bad/summary.json skipped_lines)" = 5 ] &&
  [ "$(jget bad/summary.json train_pairs)" -eq 72 ] &&
  grep -q '^bad.jsonl:41: ' bad.err && grep -q '^bad.jsonl:42: .*rejected' bad.err &&
  grep -q '^bad.jsonl:43: .*chosen' bad.err && grep -q '^bad.jsonl:44: .*chosen' bad.err &&
  grep -q '^bad.jsonl:46: .*label' bad.err && ! grep -q '^bad.jsonl:45' bad.err; then
  ok "--on-bad-line skip: 5 bad lines reported as FILE:LINE and counted, the blank one ignored"
else
  fail "bad lines, skip: exit $rc: $(cat bad.err)"
fi
"$P" --train bad.jsonl --model linear --epochs 1 --on-bad-line fail --out badf >/dev/null 2>badf.err
rc=$?
[ $rc -eq 3 ] && grep -q '^bad.jsonl:41: ' badf.err && [ ! -e badf/best.safetensors ] &&
  ok "--on-bad-line fail: exit 3 naming bad.jsonl:41, nothing trained" ||
  fail "bad lines, fail: exit $rc: $(cat badf.err)"
: >empty.jsonl
"$P" --train empty.jsonl --model linear --out emp >/dev/null 2>emp.err
rc=$?
[ $rc -eq 3 ] && grep -q 'empty.jsonl: no preference pairs' emp.err &&
  ok "an empty training file: exit 3 with a message" || fail "empty file: exit $rc: $(cat emp.err)"
sed -n 41,46p bad.jsonl >allbad.jsonl
"$P" --train train.jsonl --eval allbad.jsonl --model linear --out emp2 >/dev/null 2>emp2.err
[ $? -eq 3 ] && ok "a file of bad lines only: exit 3" || fail "all-bad eval file: $(cat emp2.err)"

# ---- margins, labels, no held-out set -----------------------------------------------------------------
awk 'NR <= 300 { sub(/}$/, ", \"margin\": 0.5, \"label\": 0.9}"); print }' train.jsonl >ml.jsonl
"$P" --train ml.jsonl --model mlp --hidden 16 --features 512 --split 1 --epochs 1 --out ml \
  >ml.out 2>ml.err
rc=$?
[ $rc -eq 0 ] && [ -s ml/best.safetensors ] && [ "$(jget ml/summary.json best_heldout_loss)" = null ] &&
  grep -q 'no held-out set' ml.out && ok "margin/label fields, mlp, --split 1" ||
  fail "margins/labels/--split 1: exit $rc: $(tail -2 ml.err)"

# ---- --init from a checkpoint --------------------------------------------------------------------------
"$P" --train train.jsonl --init g/best.safetensors --train-blocks 0 --epochs 1 --out init \
  >init.out 2>init.err
rc=$?
[ $rc -eq 0 ] && grep -q '(32 trainable)' init.err && ok "--init CKPT --train-blocks 0 (head only)" ||
  fail "--init: exit $rc: $(tail -2 init.err)"

echo "$((SECONDS - start))s"
[ $failures -eq 0 ] || {
  echo "$failures failure(s)"
  exit 1
}
echo "all passed"
