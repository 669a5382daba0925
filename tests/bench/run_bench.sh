#!/usr/bin/env bash
# run_bench.sh - libprefrm vs the PyTorch reference, same configs, same threads,
# same run, interleaved. Builds nothing.
#
#   tests/bench/run_bench.sh [BUILD_DIR]        (default: build)
#
# Environment knobs: STEPS (50), WARMUP (5), ROUNDS (2), THREADS ("1 2"),
# CONFIGS ("linear mlp"), PYTHON (/usr/bin/python3), TORCH_REF (path to
# torch_ref.py; default <repo>/../shared/reference/torch_ref.py), PROBE (1:
# also print the BLAS ceilings measured by bench_train --blas-probe).
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
set -u

BUILD=${1:-build}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
STEPS=${STEPS:-50}
WARMUP=${WARMUP:-5}
ROUNDS=${ROUNDS:-2}
THREADS=${THREADS:-"1 2"}
CONFIGS=${CONFIGS:-"linear mlp"}
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

target_of() { case $1 in linear) echo 5.0 ;; mlp) echo 1.6 ;; *) echo 1.0 ;; esac; }

FAILED=0
ROWS=()
echo "libprefrm benchmark: $(uname -n), $(nproc) CPUs, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)"
echo "BLAS: $(ldd "$BENCH" | sed -n 's/^[[:space:]]*\(lib[a-z]*blas[^ ]*\) => \([^ ]*\).*/\1 -> \2/p' | head -n 2 | tr '\n' ' ')"
echo "steps $STEPS (+$WARMUP warm-up), $ROUNDS interleaved rounds per side, peak RSS via $RSS_METHOD"
echo

for cfg in $CONFIGS; do
  for n in $THREADS; do
    best_c=""; best_t=""; rss_c=0; rss_t=0; alloc_c="?"; ms_c=""; ms_t=""
    for r in $(seq 1 "$ROUNDS"); do
      # C side
      f=$TMP/c.$cfg.$n.$r
      if OPENBLAS_NUM_THREADS=$n OMP_NUM_THREADS=$n MKL_NUM_THREADS=$n \
        run_measured "$f" "$f.rss" "$BENCH" --model "$cfg" --steps "$STEPS" --warmup "$WARMUP" \
          --no-phases; then
        v=$(json_num "$f" pairs_per_s)
        echo "  C     $cfg threads=$n round $r: $(head -n 1 "$f")"
        if [ -z "$best_c" ] || awk "BEGIN{exit !($v > $best_c)}"; then
          best_c=$v; ms_c=$(json_num "$f" ms_step_median)
        fi
        m=$(tail -n 1 "$f.rss"); [ "$m" -gt "$rss_c" ] && rss_c=$m
        a=$(json_word "$f" allocations_in_steps)
        if [ "$alloc_c" = "?" ] || [ "$a" = true ]; then alloc_c=$a; fi
      else
        echo "run_bench.sh: bench_train --model $cfg failed:" >&2
        cat "$f" >&2
        FAILED=1
      fi
      # torch side
      [ "$HAVE_TORCH" = 1 ] || continue
      f=$TMP/t.$cfg.$n.$r
      if run_measured "$f" "$f.rss" "$PYTHON" "$TORCH_REF" bench --model "$cfg" --threads "$n" \
        --steps "$STEPS" --warmup "$WARMUP"; then
        v=$(json_num "$f" pairs_per_s)
        echo "  torch $cfg threads=$n round $r: $(head -n 1 "$f")"
        if [ -z "$best_t" ] || awk "BEGIN{exit !($v > $best_t)}"; then
          best_t=$v; ms_t=$(json_num "$f" ms_step_median)
        fi
        m=$(tail -n 1 "$f.rss"); [ "$m" -gt "$rss_t" ] && rss_t=$m
      else
        echo "run_bench.sh: torch_ref.py bench --model $cfg failed:" >&2
        cat "$f" >&2
        FAILED=1
      fi
    done
    ROWS+=("$cfg|$n|${best_c:-}|${ms_c:-}|${best_t:-}|${ms_t:-}|$rss_c|$rss_t|$alloc_c")
  done
done

fmt() { awk "BEGIN{printf \"$1\", $2}"; }
echo
printf '%-7s %3s %11s %8s %13s %9s %8s %13s %9s %10s %9s %s\n' config thr "C pairs/s" "C ms" \
  "torch pairs/s" "torch ms" "C/torch" "target" "C RSS MB" "torch MB" "RSS<torch" \
  "C allocs in steps"
for row in "${ROWS[@]}"; do
  IFS='|' read -r cfg n pc mc pt mt rc rt al <<<"$row"
  tgt=$(target_of "$cfg")
  ratio="-"; met="-"; rssok="-"; tps="-"; tms="-"; trss="-"; cps="-"; cms="-"
  if [ -n "$pc" ]; then cps=$(fmt %.1f "$pc"); cms=$(fmt %.3f "$mc"); fi
  if [ -n "$pt" ]; then tps=$(fmt %.1f "$pt"); tms=$(fmt %.3f "$mt"); trss=$(fmt %.1f "$rt/1024"); fi
  if [ -n "$pc" ] && [ -n "$pt" ]; then
    ratio=$(fmt %.2f "$pc/$pt")
    met=$(awk "BEGIN{print ($pc / $pt >= $tgt) ? \"met\" : \"MISSED\"}")
    rssok=$(awk "BEGIN{print ($rc < $rt) ? \"yes\" : \"NO\"}")
  fi
  printf '%-7s %3s %11s %8s %13s %9s %8s %13s %9s %10s %9s %s\n' "$cfg" "$n" "$cps" "$cms" \
    "$tps" "$tms" "$ratio" ">=${tgt}x $met" "$(fmt %.1f "$rc/1024")" "$trss" "$rssok" "$al"
done
echo "(C allocs in steps: whole process; with >1 thread OpenBLAS's threaded GEMM mallocs a job"
echo " array per call -- bench_train's output splits the count by caller, libprefrm vs other.)"

if [ "$PROBE" = 1 ]; then
  echo
  echo "BLAS ceilings (bench_train --blas-probe: the BLAS called directly, benchmark shapes)"
  for cfg in $CONFIGS; do
    for n in $THREADS; do
      f=$TMP/p.$cfg.$n
      if OPENBLAS_NUM_THREADS=$n OMP_NUM_THREADS=$n MKL_NUM_THREADS=$n \
        "$BENCH" --model "$cfg" --steps 2 --warmup 1 --batches 8 --no-phases --blas-probe >"$f" 2>&1; then
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
