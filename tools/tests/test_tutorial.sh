#!/usr/bin/env bash
# test_tutorial.sh - run every command of docs/tutorial.md as written.
#
# The commands are the lines starting with "$ " inside ```console blocks,
# run in order by bash in a fresh folder, with prefrm-train, prefrm-score
# and make_prefs on PATH; any failing command fails the test. Blocks tagged
# ```console npm need the npm registry: they are skipped, with a message,
# when npm is missing or its first command (the install) fails.
# Exit 77 (skipped) when the programs were not built (e.g. examples off).
set -euo pipefail

src=${PFT_SOURCE_DIR:?}/docs/tutorial.md
train=${PREFRM_TRAIN:?} score=${PREFRM_SCORE:?} prefs=${MAKE_PREFS:?}
for p in "$train" "$score" "$prefs"; do
  [[ -x $p ]] || { echo "SKIP: $p not built"; exit 77; }
done
bin=$(mktemp -d "${PFT_TEST_TMPDIR:-/tmp}/tutorial-bin.XXXXXX")
work=$(mktemp -d "${PFT_TEST_TMPDIR:-/tmp}/tutorial.XXXXXX")
trap 'rm -rf "$bin" "$work"' EXIT
ln -s "$train" "$bin/prefrm-train"
ln -s "$score" "$bin/prefrm-score"
ln -s "$prefs" "$bin/make_prefs"
export PATH=$bin:$PATH

# blocks: "B <tag>" starts one, "C <command>" is a command in it
list=$work/commands.txt
awk '
  /^```console/ { inblock = 1; tag = $2; print "B " (tag == "" ? "-" : tag); next }
  /^```/        { inblock = 0; next }
  inblock && /^\$ / { print "C " substr($0, 3) }
' "$src" >"$list"
n=$(grep -c '^C ' "$list" || true)
((n > 0)) || { echo "FAIL: no commands found in $src"; exit 1; }

cd "$work"
ran=0 skipped=0 tag=- skip_block=0 first=0
while IFS= read -r line; do
  kind=${line%% *} rest=${line#* }
  if [[ $kind == B ]]; then
    tag=$rest skip_block=0 first=1
    if [[ $tag == npm ]] && ! command -v npm >/dev/null; then
      echo "SKIP block (npm not installed)"; skip_block=1
    fi
    continue
  fi
  if ((skip_block)); then skipped=$((skipped + 1)); continue; fi
  echo "\$ $rest"
  rc=0
  timeout 900 bash -c "$rest" >"$work/out.txt" 2>&1 </dev/null || rc=$?
  tail -n 4 "$work/out.txt" | sed 's/^/    /'
  if ((rc != 0)); then
    if [[ $tag == npm ]] && ((first)); then
      echo "SKIP block: the npm install failed (exit $rc; no registry?)"
      skip_block=1 skipped=$((skipped + 1)) first=0
      continue
    fi
    echo "FAIL: exit $rc"; cat "$work/out.txt"; exit 1
  fi
  first=0 ran=$((ran + 1))
done <"$list"
echo "tutorial: $ran commands ran, $skipped skipped"
((ran > 0)) || exit 77
