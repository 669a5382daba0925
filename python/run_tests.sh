#!/usr/bin/env bash
# Run the Python binding's tests against a build tree's libprefrm.
# usage: python/run_tests.sh BUILD_DIR   (CTest passes the binary dir)
# Exit 77 (CTest's skip) when python3, numpy or pytest is missing.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
build=$(cd "${1:-$here/../build}" && pwd)
py=${PYTHON:-/usr/bin/python3}
command -v "$py" >/dev/null 2>&1 || { echo "skip: no $py"; exit 77; }
"$py" -c 'import numpy, pytest' 2>/dev/null || { echo "skip: numpy or pytest missing for $py"; exit 77; }
lib="$build/libprefrm.so.0"
[ -e "$lib" ] || { echo "no $lib (build the prefrm target first)"; exit 1; }
export PREFRM_LIBRARY="$lib" OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1
export PYTHONDONTWRITEBYTECODE=1
cd "$here/.."
exec "$py" -m pytest -q -p no:cacheprovider "$here/tests"
