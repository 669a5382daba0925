#!/usr/bin/env bash
# run_deployment.sh - run the commands of docs/deployment.md as written.
#
#   run_deployment.sh SOURCE_DIR BUILD_DIR LIBDIR WORK_DIR
#
# The commands are the lines starting with "$ " inside ```console blocks. The
# page runs them from the top of a libprefrm checkout whose build folder is
# `build`, and installs under $HOME. Here they run in order in ONE bash
# shell (variables and exports carry over from one command to the next) in
# WORK_DIR, which holds `build` (a link to BUILD_DIR) and links to the
# source's examples/ and tests/; HOME is WORK_DIR/home, so nothing is
# installed outside it. Any failing command fails the test. Blocks tagged
# ```console tools need prefrm-train and prefrm-score: they are skipped, with
# a message, when the build has no tools (-DPRM_BUILD_TOOLS=OFF).
# Exit 77 (skipped) without cc, pkg-config, cmake or ldd, or when the build
# installs its libraries somewhere other than lib/ (the page's paths).
set -uo pipefail

src=${1:?source dir} build=${2:?build dir} libdir=${3:?CMAKE_INSTALL_LIBDIR} work=${4:?work dir}
page=$src/docs/deployment.md
for tool in cc pkg-config cmake ldd readelf; do
  command -v "$tool" >/dev/null || { echo "SKIP: $tool not found"; exit 77; }
done
[[ $libdir == lib ]] || { echo "SKIP: libraries install to $libdir, the page assumes lib"; exit 77; }

rm -rf "$work"
mkdir -p "$work/home"
ln -s "$build" "$work/build"
ln -s "$src/examples" "$work/examples"
ln -s "$src/tests" "$work/tests"

# blocks: "B <tag>" starts one, "C <command>" is a command in it
list=$work/commands.txt
awk '
  /^```console/ { inblock = 1; tag = $2; print "B " (tag == "" ? "-" : tag); next }
  /^```/        { inblock = 0; next }
  inblock && /^\$ / { print "C " substr($0, 3) }
' "$page" >"$list"
grep -q '^C ' "$list" || { echo "FAIL: no commands found in $page"; exit 1; }

cd "$work" || exit 1
export HOME=$work/home
unset PKG_CONFIG_PATH LD_LIBRARY_PATH CMAKE_PREFIX_PATH
ran=0 skipped=0 skip_block=0
while IFS= read -r line <&3; do
  kind=${line%% *} cmd=${line#* }
  if [[ $kind == B ]]; then
    skip_block=0
    if [[ $cmd == tools && ! -x $build/tools/prefrm-train ]]; then
      echo "SKIP block (the build has no tools)"
      skip_block=1
    fi
    continue
  fi
  if ((skip_block)); then skipped=$((skipped + 1)); continue; fi
  printf '$ %s\n' "$cmd"
  rc=0
  eval "$cmd" </dev/null >"$work/out.txt" 2>&1 || rc=$?
  sed 's/^/    /' "$work/out.txt" | tail -n 6
  if ((rc != 0)); then
    echo "FAIL: exit $rc (docs/deployment.md)"
    cat "$work/out.txt"
    exit 1
  fi
  ran=$((ran + 1))
done 3<"$list"
echo "deployment: $ran commands ran, $skipped skipped"
rm -rf "$work"
