#!/usr/bin/env bash
# hh_bench.sh - the HH-RLHF speed benchmarks of issue 12 ("Speed"): libprefrm
# and PyTorch side by side in one run, on the same byte tokens, at one thread.
# A benchmark, not a test: never run by CTest. Builds nothing.
#
#   tests/bench/hh_bench.sh [BUILD_DIR]          (default: build)
#
# 1. Training on real preference data: the three helpful HH-RLHF test files
#    pooled, bytes as tokens, context 1024, gpt2 256/1024/128x4x4, 16 pairs
#    per step (consecutive pairs of a seed-0 shuffle, the same on both sides),
#    AdamW lr 1e-4; WARMUP steps, then STEPS timed. libprefrm: one
#    prm_train_step per step on the 2P rows, (a) unshared, (b) each rejected
#    row declaring its common start with its chosen row. PyTorch: torch_ref's
#    gpt2 with chosen and rejected padded to the batch's longest row, one
#    forward of 2P rows, BT loss, backward, AdamW.
# 2. Scoring rollouts: 64 prompts x 8 responses (drawn from the same data),
#    one prompt's 8 responses per call (PROMPTS_PER_CALL), inference context
#    with and without prefix sharing vs torch's padded no_grad forward.
#
# Both sides start from the same parameters (torch_hh.py init writes them,
# bench_hh --init loads them), so their losses and first scores are compared
# too. Before timing, the unshared libprefrm runs check on the first batch
# that shared and unshared scores (and training gradients) agree.
#
# Steps: tests/bench/hh_prep.py writes the token file into a temporary folder
# (nothing of the data enters the repository); then bench_hh (libprefrm) and
# tests/bench/torch_hh.py (PyTorch) run one after the other, each in its own
# process, which reports its peak RSS (getrusage ru_maxrss). One round: on a
# shared machine, re-run (or compare the ms_steps lists in JSON_OUT).
#
# Environment: STEPS (20), WARMUP (3), BATCH (16) for training; SCORE_WARMUP
# (2), PROMPTS_PER_CALL (1), PROMPTS (64), GROUP_SIZE (8), MAX_RESPONSE (0: the
# issue's rule; R: cut drawn responses to R bytes first, as a generation limit
# would) for scoring; ONLY ("train score", or one of them); THREADS (1); SEED
# (0); LR (1e-4); SHARED (<repo>/../shared); TORCH_REF
# ($SHARED/reference/torch_ref.py); PYTHON (/usr/bin/python3); JSON_OUT (a
# file: every run's JSON line and the summaries are appended to it); KEEP (1:
# keep the temporary folder and print its path).
#
# Time at the defaults on one core: about 4-5 minutes for torch's training
# (its first step alone pays ~1 min of page faults for ~10 GB), 1-2 minutes
# for each libprefrm training run, 1-2 minutes for scoring. torch's training
# peaks near 10 GB of RSS.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
build=${1:-build}
[[ $build = /* ]] || build=$root/$build
bench=$build/tests/bench/bench_hh
shared=${SHARED:-$root/../shared}
data=$shared/data/hh-rlhf
torch_ref=${TORCH_REF:-$shared/reference/torch_ref.py}
python=${PYTHON:-/usr/bin/python3}
steps=${STEPS:-20} warmup=${WARMUP:-3} batch=${BATCH:-16} lr=${LR:-1e-4}
score_warmup=${SCORE_WARMUP:-2} per_call=${PROMPTS_PER_CALL:-1}
groups=${PROMPTS:-64} group_size=${GROUP_SIZE:-8} max_response=${MAX_RESPONSE:-0}
threads=${THREADS:-1} seed=${SEED:-0} only=${ONLY:-"train score"}

die() { echo "hh_bench: $*" >&2; exit 2; }
[[ -x $bench ]] || die "$bench not found: build first (cmake --build ${1:-build})"
for f in helpful-base-test.jsonl helpful-online-test.jsonl helpful-rejection-sampled-test.jsonl; do
  [[ -f $data/$f ]] || die "$data/$f not found: the benchmark needs the ../shared checkout (or SHARED=DIR)"
done
[[ -f $torch_ref ]] || die "$torch_ref not found: the torch side needs ../shared/reference (or TORCH_REF=FILE)"
"$python" -c 'import torch' >/dev/null 2>&1 ||
  die "$python cannot import torch: the torch side needs it (PYTHON=interpreter with torch)"
case " $only " in *" train "* | *" score "*) ;; *) die "ONLY='$only': say train, score or both" ;; esac

tmp=$(mktemp -d "${TMPDIR:-/tmp}/hh_bench.XXXXXX")
if [[ ${KEEP:-0} = 1 ]]; then
  echo "hh_bench: keeping $tmp"
else
  trap 'rm -rf "$tmp"' EXIT
fi
export OPENBLAS_NUM_THREADS=$threads OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
runs=$tmp/runs.jsonl
: >"$runs"

# run LABEL cmd...: runs cmd, its output to $tmp/LABEL.log; prints its human
# lines; its JSON line goes to $runs. A failure stops the benchmark.
run() {
  local label=$1
  shift
  local t0=$SECONDS
  if ! "$@" >"$tmp/$label.log" 2>&1; then
    echo "hh_bench: $label failed:" >&2
    sed 's/^/  /' "$tmp/$label.log" >&2
    exit 1
  fi
  { grep -v '^JSON ' "$tmp/$label.log" || true; } | sed "s/^/  [$label, $((SECONDS - t0)) s] /"
  sed -n 's/^JSON //p' "$tmp/$label.log" >>"$runs"
}

echo "hh_bench: $(getconf _NPROCESSORS_ONLN) cores, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)," \
  "load $(cut -d' ' -f1-3 /proc/loadavg); threads $threads"
run prep "$python" "$here/hh_prep.py" --out "$tmp/tokens.bin" --data "$data" --seed "$seed" \
  --groups "$groups" --group-size "$group_size" --max-response "$max_response" --batch "$batch"
run init "$python" "$here/torch_hh.py" init --out "$tmp/init.safetensors" --seed "$seed" --ref "$torch_ref"
common=(--data "$tmp/tokens.bin" --init "$tmp/init.safetensors" --threads "$threads")
tcommon=("${common[@]}" --ref "$torch_ref")

if [[ " $only " = *" train "* ]]; then
  echo "hh_bench: training, $batch pairs/step, $warmup warm-up + $steps timed steps"
  targs=(--batch "$batch" --warmup "$warmup" --steps "$steps" --lr "$lr")
  run prm-train-unshared "$bench" train "${common[@]}" "${targs[@]}"
  run prm-train-shared "$bench" train --share "${common[@]}" "${targs[@]}"
  run torch-train "$python" "$here/torch_hh.py" train "${tcommon[@]}" "${targs[@]}"
fi
if [[ " $only " = *" score "* ]]; then
  echo "hh_bench: scoring, $groups prompts x $group_size responses, $per_call prompt(s) per call"
  sargs=(--prompts-per-call "$per_call" --warmup "$score_warmup")
  run prm-score-unshared "$bench" score "${common[@]}" "${sargs[@]}"
  run prm-score-shared "$bench" score --share "${common[@]}" "${sargs[@]}"
  run torch-score "$python" "$here/torch_hh.py" score "${tcommon[@]}" "${sargs[@]}"
fi

echo
"$python" - "$runs" <<'PY' | tee "$tmp/summary.txt"
import json, sys

runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
prep = next(r for r in runs if "whole_data" in r)


def pick(mode, impl, variant):
    return next((r for r in runs if r.get("mode") == mode and r.get("impl") == impl
                 and r.get("variant") == variant), None)


def mib(kb):
    return kb / 1024.0


def rel(a, b):
    scale = max(max(abs(y) for y in b), 1e-30)
    return max(abs(x - y) for x, y in zip(a, b)) / scale


wd = prep["whole_data"]
cfg = None
summaries = []
for mode in ("train", "score"):
    un, sh, to = (pick(mode, "libprefrm", "unshared"), pick(mode, "libprefrm", "shared"),
                  pick(mode, "torch", "padded"))
    if not (un and sh and to):
        continue
    c = to["config"]
    if cfg is None:
        cfg = c
        print(f"HH-RLHF speed: gpt2 vocab {c['vocab_size']}, ctx {c['n_positions']}, width "
              f"{c['n_embd']}, {c['n_layer']} layers, {c['n_head']} heads; byte tokens; "
              f"threads {to['threads']}; {prep['records']} pairs pooled "
              f"(helpful base, online, rejection-sampled test)")
    if mode == "train":
        P = to["pairs_per_step"]
        print(f"\nTraining: {P} pairs/step, {to['warmup']} warm-up + {to['steps']} timed steps, "
              f"AdamW lr {to['lr']:g}; the same pairs in the same order on each side")
        unit, rate, per, tkey = "ms/step", "pairs/s", "tok/pair", "tokens_per_pair"
        ms = lambda r: r["ms_step_median"]
        speed = lambda r: r["pairs_per_s"]
    else:
        print(f"\nScoring rollouts: {to['prompts']} prompts x {to['group_size']} responses, "
              f"{to['rows_per_call']} rows per call, {to['warmup']} warm-up calls; every call "
              f"timed")
        unit, rate, per, tkey = "ms/call", "resp/s", "tok/resp", "tokens_per_response"
        ms = lambda r: r["ms_call_median"]
        speed = lambda r: r["responses_per_s"]
    print(f"  {'side':<30}{unit:>10}{rate:>10}{per:>10}{'vs torch':>10}{'peak RSS':>12}")
    for name, r in (("libprefrm, no prefixes", un), ("libprefrm, shared prefixes", sh),
                    ("torch, padded", to)):
        print(f"  {name:<30}{ms(r):>10.1f}{speed(r):>10.2f}{r[tkey]:>10.1f}"
              f"{speed(r) / speed(to):>9.2f}x{mib(r['peak_rss_kb']):>8.0f} MiB")
    padded, packed, shared = to["padded_tokens"], un["packed_tokens"], sh["shared_tokens"]
    assert packed == to["packed_tokens"], "the two sides saw different tokens"
    line = (f"  tokens computed: padded/packed {padded / packed:.3f}, packed/shared "
            f"{packed / shared:.3f}")
    if mode == "train":
        line += (f" (whole data in batches of {wd['pairs'] // wd['batches']}: "
                 f"{wd['padded_over_packed']:.3f} and {wd['packed_over_shared']:.3f}; "
                 f"issue: ~1.48 and ~1.34)")
    print(line)
    print(f"  libprefrm shared vs no prefixes: {speed(sh) / speed(un):.2f}x the speed for "
          f"{un['tokens_computed'] / sh['tokens_computed']:.2f}x fewer tokens; "
          f"libprefrm/torch peak RSS {mib(un['peak_rss_kb']):.0f}/{mib(to['peak_rss_kb']):.0f} MiB")
    ck = un.get("check")
    s = {"bench": "hh_" + mode, "torch_per_s": speed(to), "prm_unshared_per_s": speed(un),
         "prm_shared_per_s": speed(sh), "ratio_unshared": speed(un) / speed(to),
         "ratio_shared": speed(sh) / speed(to), "tokens_padded": padded, "tokens_packed": packed,
         "tokens_shared": shared, "padded_over_packed": padded / packed,
         "packed_over_shared": packed / shared, "peak_rss_kb_torch": to["peak_rss_kb"],
         "peak_rss_kb_prm_unshared": un["peak_rss_kb"], "peak_rss_kb_prm_shared": sh["peak_rss_kb"],
         "check": ck}
    if ck:
        extra = f", gradients {ck['grad_rel_diff']:.1e}" if mode == "train" else ""
        print(f"  check (first batch, before timing): shared vs unshared scores {ck['score_rel_diff']:.1e}"
              f"{extra} of their largest magnitude")
    if mode == "train":
        lu, ls, lt = un["losses"], sh["losses"], to["losses"]
        d0 = max(abs(lu[0] - lt[0]), abs(ls[0] - lt[0]))
        dl = max(abs(lu[-1] - lt[-1]), abs(ls[-1] - lt[-1]))
        print(f"  losses, same initial model: step 1 torch {lt[0]:.5f}, libprefrm {lu[0]:.5f} / "
              f"{ls[0]:.5f} (no prefixes / shared); last step torch {lt[-1]:.5f}, libprefrm "
              f"{lu[-1]:.5f} / {ls[-1]:.5f}")
        s.update(pairs_per_step=P, steps=to["steps"], warmup=to["warmup"],
                 loss_first_max_diff=d0, loss_last_max_diff=dl,
                 whole_data_padded_over_packed=wd["padded_over_packed"],
                 whole_data_packed_over_shared=wd["packed_over_shared"])
    else:
        du = rel(un["scores_first"], to["scores_first"])
        ds = rel(sh["scores_first"], to["scores_first"])
        print(f"  scores of the first call, same model: libprefrm vs torch differ by {du:.1e} "
              f"(no prefixes) / {ds:.1e} (shared) of their largest magnitude")
        s.update(rows_per_call=to["rows_per_call"], prompts=to["prompts"],
                 group_size=to["group_size"], max_response=prep["max_response"],
                 prompt_kept_mean=prep["group_prompt_mean"],
                 groups_without_prompt=prep["groups_without_prompt"],
                 scores_vs_torch_unshared=du, scores_vs_torch_shared=ds)
        print(f"  prompts kept after the 1024 cut: {prep['group_prompt_mean']:.0f} bytes on "
              f"average, none in {prep['groups_without_prompt']} of {to['prompts']} groups"
              + (f" (responses cut to {prep['max_response']} bytes first)" if prep["max_response"]
                 else ""))
    summaries.append(s)
print()
for s in summaries:
    print("JSON " + json.dumps(s))
PY
if [[ -n ${JSON_OUT:-} ]]; then
  cat "$runs" >>"$JSON_OUT"
  sed -n 's/^JSON //p' "$tmp/summary.txt" >>"$JSON_OUT"
fi
