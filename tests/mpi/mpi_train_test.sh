#!/usr/bin/env bash
# tests/mpi/mpi_train_test.sh - data-parallel training gives the single-process result.
#
#   bash tests/mpi/mpi_train_test.sh MPI_TRAIN COMPARE_PARAMS WORKDIR
#
# Runs examples/mpi_train on the same global batches three ways: one rank
# (the reference, every pair of a step in one process), 2 ranks and 4 ranks
# (oversubscribed on small machines). Checks, after STEPS (60) steps:
#   - every rank of a run saved byte-identical parameters (cmp);
#   - the 2- and 4-rank parameters match the 1-rank ones within RTOL (1e-5)
#     relative (compare_params.c says how it is measured).
# Exit 77 (CTest: skipped) when mpirun is missing.
set -euo pipefail

mpi_train=$1 compare=$2 work=$3
steps=${STEPS:-60}
rtol=${RTOL:-1e-5}

if ! command -v mpirun >/dev/null; then
  echo "SKIPPED: no mpirun on PATH (Debian: openmpi-bin)"
  exit 77
fi
mpirun --version 2>/dev/null | head -1

# One BLAS thread per rank: the ranks are the parallelism (docs/distributed.md).
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 BLIS_NUM_THREADS=1
# --allow-run-as-root: CI runs as root. --oversubscribe: 4 ranks on a 2-core
# machine. One node, so shared memory only (btl self,vader); its single-copy
# mode (CMA) needs ptrace rights that containers often withhold, and
# mpi_yield_when_idle stops waiting ranks from spinning against the ranks
# (and other tests) that have work.
mpirun_opts=(--allow-run-as-root --oversubscribe --mca btl self,vader
             --mca btl_vader_single_copy_mechanism none --mca mpi_yield_when_idle 1)
train_opts=(--pairs 256 --dataset 4096 --steps "$steps" --log-every 20 --seed 7)

rm -rf "$work"
mkdir -p "$work"
fail=0
for np in 1 2 4; do
  echo "== mpirun -np $np mpi_train ${train_opts[*]}"
  start=$SECONDS
  mpirun "${mpirun_opts[@]}" -np "$np" "$mpi_train" "${train_opts[@]}" \
    --out "$work/np$np.safetensors" --rank-out "$work/np$np.rank" >"$work/np$np.log" 2>&1 ||
    { cat "$work/np$np.log"; echo "FAIL: mpirun -np $np exited non-zero"; exit 1; }
  cat "$work/np$np.log"
  echo "   ($((SECONDS - start)) s)"
  grep -q "^mpi_train: .* $np rank" "$work/np$np.log" ||
    { echo "FAIL: mpi_train did not run with $np ranks"; exit 1; }
  for ((r = 1; r < np; r++)); do
    if cmp "$work/np$np.rank0.safetensors" "$work/np$np.rank$r.safetensors"; then
      echo "rank $r of $np: parameters byte-identical to rank 0's"
    else
      echo "FAIL: rank $r of $np holds other parameters than rank 0"
      fail=1
    fi
  done
done
cmp "$work/np1.safetensors" "$work/np1.rank0.safetensors" >/dev/null ||
  { echo "FAIL: rank 0's --out and --rank-out files differ"; fail=1; }
"$compare" "$rtol" "$work/np1.safetensors" "$work/np2.safetensors" "$work/np4.safetensors" || fail=1
((fail == 0)) || { echo "FAIL"; exit 1; }
echo "PASS: 2 and 4 ranks match 1 rank within $rtol after $steps steps; ranks identical"
