#!/usr/bin/env bash
# run_bench.sh - libprefrm vs the PyTorch reference, same configs, same threads,
# same run, interleaved. Builds nothing.
#
#   tests/bench/run_bench.sh [BUILD_DIR]        (default: build)
#
# Environment knobs: STEPS (50), WARMUP (5), ROUNDS (2), THREADS ("1 2"),
# CONFIGS ("linear mlp gpt2-tiny gpt2-small llama-tiny llama-small"; any
# subset, e.g. CONFIGS="gpt2-tiny gpt2-small" or CONFIGS="llama-tiny
# llama-small"), PYTHON (/usr/bin/python3), TORCH_REF (path to torch_ref.py;
# default <repo>/../shared/reference/torch_ref.py), PROBE (1: also print the
# BLAS ceilings measured by bench_train --blas-probe).
# Token-model knobs (a torch gpt2-small step takes about 2 s, so few steps):
# GPT2_TINY_STEPS (10), GPT2_SMALL_STEPS (5), GPT2_WARMUP (2) for training,
# LLAMA_TINY_STEPS, LLAMA_SMALL_STEPS (default: the gpt2 values), the warm-up
# GPT2_WARMUP for both, SCORE_TINY_STEPS (20), SCORE_SMALL_STEPS (8) forwards
# for scoring (both families), SCORE_TARGET (1.5, gpt2), LLAMA_SCORE_TARGET
# (1.6).
#
# For each config and thread count N it runs, ROUNDS times in alternation,
#   bench_train --model M            with OPENBLAS_NUM_THREADS=OMP_NUM_THREADS=N
#   torch_ref.py bench --model M --threads N   (sets the same variables itself)
# and reports the best round of each side (max pairs/s: the least disturbed
# by other load on a shared VM) and the largest peak RSS, measured the same
# way for both programs (/usr/bin/time's %M; without it, by polling VmHWM in
# /proc/PID/status). Targets: linear >= 5x, mlp >= 1.6x torch's pairs/s, and
# peak RSS below torch's. A missed target is reported, never an exit status:
# the script fails only when a program cannot be run.
#
# Token-model configs (torch_ref's flags; every sequence full length):
#   gpt2-tiny   vocab 512,  ctx 128, dim 128, 4 layers, 4 heads, 16 pairs/step
#   gpt2-small  vocab 8192, ctx 256, dim 256, 6 layers, 8 heads,  8 pairs/step
#   llama-tiny  vocab 512,  ctx 128, dim 128, 4 layers, 4 heads, 2 kv heads,
#               SwiGLU 384, 16 pairs/step
#   llama-small vocab 8192, ctx 256, dim 256, 6 layers, 8 heads, 2 kv heads,
#               SwiGLU 768,  8 pairs/step
# For each thread count and round: training (bench_train --model M vs
# torch_ref.py bench --model M) and scoring of 2P sequences per call
# (bench_train --model M --score, an inference context, vs
# tests/bench/torch_score.py --model M, torch's no_grad forward). Targets:
# training >= 1.5x (gpt2-tiny), >= 1.25x (gpt2-small), >= 1.6x (llama-tiny),
# >= 1.4x (llama-small) torch's pairs/s; scoring >= 1.5x (gpt2), >= 1.6x
# (llama) torch's seqs/s; peak RSS at most half of torch's. GFLOP/s use
# torch_ref's FLOP formula on both sides; MFU = GFLOP/s / (threads x the
# single-thread cblas_sgemm 1024^3 peak), the peak measured in the same run
# (before and after the token-model runs; the larger is used).
set -u

BUILD=${1:-build}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
STEPS=${STEPS:-50}
WARMUP=${WARMUP:-5}
ROUNDS=${ROUNDS:-2}
THREADS=${THREADS:-"1 2"}
CONFIGS=${CONFIGS:-"linear mlp gpt2-tiny gpt2-small llama-tiny llama-small"}
GPT2_TINY_STEPS=${GPT2_TINY_STEPS:-10}
GPT2_SMALL_STEPS=${GPT2_SMALL_STEPS:-5}
GPT2_WARMUP=${GPT2_WARMUP:-2}
LLAMA_TINY_STEPS=${LLAMA_TINY_STEPS:-$GPT2_TINY_STEPS}
LLAMA_SMALL_STEPS=${LLAMA_SMALL_STEPS:-$GPT2_SMALL_STEPS}
SCORE_TINY_STEPS=${SCORE_TINY_STEPS:-20}
SCORE_SMALL_STEPS=${SCORE_SMALL_STEPS:-8}
SCORE_TARGET=${SCORE_TARGET:-1.5}
LLAMA_SCORE_TARGET=${LLAMA_SCORE_TARGET:-1.6}
PYTHON=${PYTHON:-/usr/bin/python3}
TORCH_REF=${TORCH_REF:-$ROOT/../shared/reference/torch_ref.py}
PROBE=${PROBE:-1}

case $BUILD in /*) ;; *) [ -d "$BUILD" ] || BUILD=$ROOT/$BUILD ;; esac
BENCH=$BUILD/tests/bench/bench_train
if [ ! -x "$BENCH" ]; then
  echo "run_bench.sh: $BENCH not found; build first (cmake --build $BUILD)" >&2
  exit 2
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/prm_bench.XXXXXX") || exit 2
trap 'rm -rf "$TMP"' EXIT

# ---- is the torch side available? ----
HAVE_TORCH=1
if [ ! -f "$TORCH_REF" ]; then
  echo "note: $TORCH_REF not found (no ../shared checkout): torch side skipped"
  HAVE_TORCH=0
elif ! "$PYTHON" -c 'import torch' >/dev/null 2>&1; then
  echo "note: $PYTHON cannot import torch: torch side skipped"
  HAVE_TORCH=0
fi

# ---- peak RSS of a command: /usr/bin/time, else poll /proc/PID/status ----
if [ -x /usr/bin/time ] && /usr/bin/time -f %M -o "$TMP/t" true 2>/dev/null; then
  RSS_METHOD="/usr/bin/time %M (ru_maxrss of the child)"
else
  RSS_METHOD="VmHWM from /proc/PID/status, polled every 50 ms"
fi

# run_measured OUTFILE RSSFILE cmd...: runs cmd, stdout+stderr to OUTFILE,
# peak RSS in kB to RSSFILE. Returns the command's exit status.
run_measured() {
  local out=$1 rss=$2
  shift 2
  if [ "${RSS_METHOD#/usr/bin/time}" != "$RSS_METHOD" ]; then
    /usr/bin/time -f %M -o "$rss" "$@" >"$out" 2>&1
    return $?
  fi
  "$@" >"$out" 2>&1 &
  local pid=$! hwm=0 v
  while kill -0 "$pid" 2>/dev/null; do
    v=$(sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$pid/status" 2>/dev/null)
    [ -n "$v" ] && [ "$v" -gt "$hwm" ] && hwm=$v
    sleep 0.05
  done
  wait "$pid"
  local rc=$?
  echo "$hwm" >"$rss"
  return $rc
}

# json_num FILE KEY: the number after "KEY": in the JSON line of FILE.
json_num() {
  sed -n "s/^JSON .*\"$2\": \\([-0-9.eE+]*\\).*/\\1/p" "$1" | head -n 1
}
json_word() {
  sed -n "s/^JSON .*\"$2\": \\([a-z]*\\).*/\\1/p" "$1" | head -n 1
}

target_of() {
  case $1 in
    linear) echo 5.0 ;; mlp) echo 1.6 ;; gpt2-tiny) echo 1.5 ;; gpt2-small) echo 1.25 ;;
    llama-tiny) echo 1.6 ;; llama-small) echo 1.4 ;; *) echo 1.0 ;;
  esac
}
# scoring target of a token-model config
score_target_of() { case $1 in llama-*) echo "$LLAMA_SCORE_TARGET" ;; *) echo "$SCORE_TARGET" ;; esac; }

FAILED=0
declare -A BEST MS GF RSS ALLOC LIBALLOC
echo "libprefrm benchmark: $(uname -n), $(nproc) CPUs, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)"
echo "BLAS: $(ldd "$BENCH" | sed -n 's/^[[:space:]]*\(lib[a-z]*blas[^ ]*\) => \([^ ]*\).*/\1 -> \2/p' | head -n 2 | tr '\n' ' ')"
echo "steps: linear/mlp $STEPS (+$WARMUP warm-up); gpt2 training $GPT2_TINY_STEPS/$GPT2_SMALL_STEPS," \
  "llama training $LLAMA_TINY_STEPS/$LLAMA_SMALL_STEPS, scoring $SCORE_TINY_STEPS/$SCORE_SMALL_STEPS" \
  "forwards (tiny/small, +$GPT2_WARMUP warm-up)"
echo "$ROUNDS interleaved rounds per side, peak RSS via $RSS_METHOD"
echo

# measure TAG LABEL ROUND cmd...: one run; keeps, per TAG, the best round
# (max pairs/s or seqs/s) with its ms and GFLOP/s, the largest peak RSS, and
# whether any round saw allocations in its timed steps. TAG is
# side.mode.config.threads, mode train or score.
measure() {
  local tag=$1 label=$2 r=$3
  shift 3
  local f=$TMP/$tag.$r key=pairs_per_s msk=ms_step_median v m a l
  case $tag in *.score.*) key=seqs_per_s; msk=ms_forward_median ;; esac
  if run_measured "$f" "$f.rss" "$@"; then
    v=$(json_num "$f" $key)
    echo "  $label round $r: $(head -n 1 "$f")"
    if [ -z "${BEST[$tag]:-}" ] || awk "BEGIN{exit !($v > ${BEST[$tag]})}"; then
      BEST[$tag]=$v
      MS[$tag]=$(json_num "$f" $msk)
      GF[$tag]=$(json_num "$f" gflops_per_s)
    fi
    m=$(tail -n 1 "$f.rss")
    [ "$m" -gt "${RSS[$tag]:-0}" ] && RSS[$tag]=$m
    a=$(json_word "$f" allocations_in_steps)
    if [ -n "$a" ] && { [ -z "${ALLOC[$tag]:-}" ] || [ "$a" = true ]; }; then ALLOC[$tag]=$a; fi
    l=$(json_num "$f" malloc_calls_in_steps_libprefrm)
    if [ -n "$l" ] && { [ -z "${LIBALLOC[$tag]:-}" ] || [ "$l" -gt "${LIBALLOC[$tag]}" ]; }; then
      LIBALLOC[$tag]=$l
    fi
  else
    echo "run_bench.sh: $label failed:" >&2
    cat "$f" >&2
    FAILED=1
  fi
  return 0
}

# Token-model configs (gpt2-*, llama-*): the model (the part before "-"),
# the model flags shared by bench_train, torch_ref and torch_score, steps and
# warm-up of training and of scoring.
tok_model() { echo "${1%%-*}"; }
tok_flags() {
  case $1 in
    gpt2-tiny) echo "--vocab 512 --ctx 128 --dim 128 --layers 4 --heads 4 --batch 16" ;;
    gpt2-small) echo "--vocab 8192 --ctx 256 --dim 256 --layers 6 --heads 8 --batch 8" ;;
    llama-tiny)
      echo "--vocab 512 --ctx 128 --dim 128 --layers 4 --heads 4 --kv-heads 2 --ffn 384 --batch 16" ;;
    llama-small)
      echo "--vocab 8192 --ctx 256 --dim 256 --layers 6 --heads 8 --kv-heads 2 --ffn 768 --batch 8" ;;
  esac
}
tok_steps() {
  case $1 in
    gpt2-tiny) echo "$GPT2_TINY_STEPS" ;; gpt2-small) echo "$GPT2_SMALL_STEPS" ;;
    llama-tiny) echo "$LLAMA_TINY_STEPS" ;; *) echo "$LLAMA_SMALL_STEPS" ;;
  esac
}
tok_score_steps() {
  case $1 in *-tiny) echo "$SCORE_TINY_STEPS" ;; *) echo "$SCORE_SMALL_STEPS" ;; esac
}
is_tok() { case $1 in gpt2-* | llama-*) return 0 ;; *) return 1 ;; esac; }

# sgemm_peak: prints the single-thread cblas_sgemm 1024^3 GFLOP/s (bench_train --blas-probe
# on the gpt2 defaults, whatever configs run; one training step plus the probe, about 2 s);
# nothing on failure.
sgemm_peak() {
  local f=$TMP/peak.$RANDOM
  if OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$BENCH" --model gpt2 \
    --steps 1 --warmup 1 --no-phases --blas-probe >"$f" 2>&1; then
    json_num "$f" sgemm_1024_gflops
  else
    echo "run_bench.sh: bench_train --blas-probe failed:" >&2
    cat "$f" >&2
  fi
}

HAVE_TOK=0
for cfg in $CONFIGS; do is_tok "$cfg" && HAVE_TOK=1; done
PEAK1=""
if [ "$HAVE_TOK" = 1 ]; then
  PEAK1=$(sgemm_peak)
  [ -n "$PEAK1" ] || FAILED=1
  echo "single-thread cblas_sgemm 1024^3 peak (before the token-model runs): ${PEAK1:-?} GFLOP/s"
fi

for cfg in $CONFIGS; do
  for n in $THREADS; do
    for r in $(seq 1 "$ROUNDS"); do
      export OPENBLAS_NUM_THREADS=$n OMP_NUM_THREADS=$n MKL_NUM_THREADS=$n
      if is_tok "$cfg"; then
        mdl=$(tok_model "$cfg")
        # shellcheck disable=SC2046
        set -- $(tok_flags "$cfg")
        s=$(tok_steps "$cfg")
        ss=$(tok_score_steps "$cfg")
        measure "C.train.$cfg.$n" "C     $cfg train threads=$n" "$r" \
          "$BENCH" --model "$mdl" "$@" --steps "$s" --warmup "$GPT2_WARMUP" --no-phases
        [ "$HAVE_TORCH" = 1 ] && measure "torch.train.$cfg.$n" "torch $cfg train threads=$n" "$r" \
          "$PYTHON" "$TORCH_REF" bench --model "$mdl" "$@" --threads "$n" --steps "$s" \
          --warmup "$GPT2_WARMUP"
        measure "C.score.$cfg.$n" "C     $cfg score threads=$n" "$r" \
          "$BENCH" --model "$mdl" "$@" --score --steps "$ss" --warmup "$GPT2_WARMUP"
        [ "$HAVE_TORCH" = 1 ] && measure "torch.score.$cfg.$n" "torch $cfg score threads=$n" "$r" \
          "$PYTHON" "$HERE/torch_score.py" --ref "$TORCH_REF" --model "$mdl" "$@" --threads "$n" \
          --steps "$ss" --warmup "$GPT2_WARMUP"
      else
        measure "C.train.$cfg.$n" "C     $cfg threads=$n" "$r" \
          "$BENCH" --model "$cfg" --steps "$STEPS" --warmup "$WARMUP" --no-phases
        [ "$HAVE_TORCH" = 1 ] && measure "torch.train.$cfg.$n" "torch $cfg threads=$n" "$r" \
          "$PYTHON" "$TORCH_REF" bench --model "$cfg" --threads "$n" --steps "$STEPS" \
          --warmup "$WARMUP"
      fi
      unset OPENBLAS_NUM_THREADS OMP_NUM_THREADS MKL_NUM_THREADS
    done
  done
done

if [ "$HAVE_TOK" = 1 ]; then
  p2=$(sgemm_peak)
  [ -n "$p2" ] || FAILED=1
  echo "single-thread cblas_sgemm 1024^3 peak (after the token-model runs): ${p2:-?} GFLOP/s"
  # the less disturbed of the two measurements
  if [ -z "$PEAK1" ] || { [ -n "$p2" ] && awk "BEGIN{exit !($p2 > $PEAK1)}"; }; then PEAK1=$p2; fi
fi

fmt() { awk "BEGIN{printf \"$1\", $2}"; }
# cell FORMAT VALUE: formatted value, "-" when empty
cell() { if [ -n "$2" ]; then fmt "$1" "$2"; else echo -; fi; }
alloc_cell() {
  local a=${ALLOC[$1]:-?} l=${LIBALLOC[$1]:-}
  if [ "$a" = true ] && [ -n "$l" ]; then echo "true (libprefrm $l)"; else echo "$a"; fi
}

# tok_rows MODE RATE_FORMAT FAMILY: the table rows of one mode (train or
# score) for every config of FAMILY (gpt2 or llama) and thread count; the
# target is the config's training or scoring target.
tok_rows() {
  local mode=$1 rfmt=$2 fam=$3
  local cfg n c t pc pt rc rt tgt ratio met rssok
  for cfg in $CONFIGS; do
    is_tok "$cfg" || continue
    [ "$(tok_model "$cfg")" = "$fam" ] || continue
    for n in $THREADS; do
      c=C.$mode.$cfg.$n t=torch.$mode.$cfg.$n
      pc=${BEST[$c]:-} pt=${BEST[$t]:-} rc=${RSS[$c]:-0} rt=${RSS[$t]:-0}
      if [ "$mode" = score ]; then tgt=$(score_target_of "$cfg"); else tgt=$(target_of "$cfg"); fi
      ratio="-"; met="-"; rssok="-"
      if [ -n "$pc" ] && [ -n "$pt" ]; then
        ratio=$(fmt %.2f "$pc/$pt")
        met=$(awk "BEGIN{print ($pc / $pt >= $tgt) ? \"met\" : \"MISSED\"}")
        rssok=$(awk "BEGIN{print ($rc <= 0.5 * $rt) ? \"yes\" : \"NO\"}")
      fi
      printf '%-11s %3s %9s %9s %7s %5s %9s %9s %7s %5s %7s %12s %7s %7s %8s %s\n' "$cfg" "$n" \
        "$(cell "$rfmt" "$pc")" "$(cell %.1f "${MS[$c]:-}")" "$(cell %.1f "${GF[$c]:-}")" \
        "$(mfu "${GF[$c]:-}" "$n")" "$(cell "$rfmt" "$pt")" "$(cell %.1f "${MS[$t]:-}")" \
        "$(cell %.1f "${GF[$t]:-}")" "$(mfu "${GF[$t]:-}" "$n")" "$ratio" ">=${tgt}x $met" \
        "$(fmt %.1f "$rc/1024")" "$( [ -n "$pt" ] && fmt %.1f "$rt/1024" || echo -)" "$rssok" \
        "$(alloc_cell "$c")"
    done
  done
}

echo
HAVE_DENSE=0
for cfg in $CONFIGS; do is_tok "$cfg" || HAVE_DENSE=1; done
if [ "$HAVE_DENSE" = 1 ]; then
  printf '%-7s %3s %11s %8s %13s %9s %8s %13s %9s %10s %9s %s\n' config thr "C pairs/s" "C ms" \
    "torch pairs/s" "torch ms" "C/torch" "target" "C RSS MB" "torch MB" "RSS<torch" \
    "C allocs in steps"
  for cfg in $CONFIGS; do
    is_tok "$cfg" && continue
    for n in $THREADS; do
      c=C.train.$cfg.$n t=torch.train.$cfg.$n
      pc=${BEST[$c]:-} pt=${BEST[$t]:-} rc=${RSS[$c]:-0} rt=${RSS[$t]:-0}
      tgt=$(target_of "$cfg")
      ratio="-"; met="-"; rssok="-"
      if [ -n "$pc" ] && [ -n "$pt" ]; then
        ratio=$(fmt %.2f "$pc/$pt")
        met=$(awk "BEGIN{print ($pc / $pt >= $tgt) ? \"met\" : \"MISSED\"}")
        rssok=$(awk "BEGIN{print ($rc < $rt) ? \"yes\" : \"NO\"}")
      fi
      printf '%-7s %3s %11s %8s %13s %9s %8s %13s %9s %10s %9s %s\n' "$cfg" "$n" \
        "$(cell %.1f "$pc")" "$(cell %.3f "${MS[$c]:-}")" "$(cell %.1f "$pt")" \
        "$(cell %.3f "${MS[$t]:-}")" "$ratio" ">=${tgt}x $met" "$(fmt %.1f "$rc/1024")" \
        "$( [ -n "$pt" ] && fmt %.1f "$rt/1024" || echo -)" "$rssok" "${ALLOC[$c]:-?}"
    done
  done
  echo "(C allocs in steps: whole process; with >1 thread OpenBLAS's threaded GEMM mallocs a job"
  echo " array per call -- bench_train's output splits the count by caller, libprefrm vs other.)"
fi

if [ "$HAVE_TOK" = 1 ]; then
  # mfu GFLOPS N: GFLOP/s / (N x single-thread sgemm peak)
  mfu() { if [ -n "$1" ] && [ -n "$PEAK1" ]; then fmt %.0f%% "100*$1/($2*$PEAK1)"; else echo -; fi; }
  for fam in gpt2 llama; do
    have=0
    for cfg in $CONFIGS; do is_tok "$cfg" && [ "$(tok_model "$cfg")" = "$fam" ] && have=1; done
    [ "$have" = 1 ] || continue
    echo
    echo "$fam training (prm_train_step vs torch_ref bench; GFLOP/s from torch_ref's formula;"
    echo " MFU = GFLOP/s / (threads x single-thread sgemm 1024^3 peak ${PEAK1:-?} GFLOP/s))"
    printf '%-11s %3s %9s %9s %7s %5s %9s %9s %7s %5s %7s %12s %7s %7s %8s %s\n' config thr \
      "C pairs/s" "C ms" "C GF/s" "C MFU" "t pairs/s" "t ms" "t GF/s" "t MFU" "C/t" "target" \
      "C MB" "t MB" "RSS<=t/2" "C allocs in steps"
    tok_rows train %.2f "$fam"
    echo
    echo "$fam scoring (prm_ctx_forward, inference context, vs torch no_grad forward; 2P"
    echo " sequences per call)"
    printf '%-11s %3s %9s %9s %7s %5s %9s %9s %7s %5s %7s %12s %7s %7s %8s %s\n' config thr \
      "C seqs/s" "C ms" "C GF/s" "C MFU" "t seqs/s" "t ms" "t GF/s" "t MFU" "C/t" "target" \
      "C MB" "t MB" "RSS<=t/2" "C allocs in calls"
    tok_rows score %.1f "$fam"
  done
  echo "(t = torch. FLOPs count every position and the full T x T attention, as torch_ref does;"
  echo " libprefrm skips most of the last block and the masked half of attention, so its MFU"
  echo " is in model FLOPs and may exceed what the cores executed.)"
fi
echo

if [ "$PROBE" = 1 ]; then
  echo
  echo "BLAS ceilings (bench_train --blas-probe: the BLAS called directly, benchmark shapes)"
  for cfg in $CONFIGS; do
    if is_tok "$cfg"; then
      # shellcheck disable=SC2046
      set -- --model "$(tok_model "$cfg")" $(tok_flags "$cfg") --steps 1 --warmup 1
    else
      set -- --model "$cfg" --steps 2 --warmup 1 --batches 8
    fi
    for n in $THREADS; do
      f=$TMP/p.$cfg.$n
      if OPENBLAS_NUM_THREADS=$n OMP_NUM_THREADS=$n MKL_NUM_THREADS=$n \
        "$BENCH" "$@" --no-phases --blas-probe >"$f" 2>&1; then
        echo " $cfg, $n thread(s):"
        sed -n 's/^  \(sg[a-z]*\)/    \1/p' "$f"
      else
        echo "run_bench.sh: bench_train --blas-probe failed:" >&2
        cat "$f" >&2
        FAILED=1
      fi
    done
  done
fi

exit $FAILED
