#!/usr/bin/env bash
# check_samples.sh - every C sample in README.md and docs/**/*.md is real code.
#
#   check_samples.sh SOURCE_DIR CC INCLUDE_DIR LIBRARY WORK_DIR [SANITIZE]
#
# Each ```c fenced block is one of three kinds, chosen by the line just
# before its opening fence:
#
#   (no marker)                           a complete program: written out,
#                                         compiled with CC -std=c11 -Wall
#                                         -Wextra -Werror against INCLUDE_DIR
#                                         and LIBRARY (the libprefrm just
#                                         built), run in an empty folder; it
#                                         must exit 0 within 60 s.
#   <!-- excerpt: examples/FILE.c -->     lines of a real example: the block
#                                         must appear in that file verbatim,
#                                         line for line (the whole block may
#                                         be indented there, e.g. inside a
#                                         function). The example is built by
#                                         examples/CMakeLists.txt and run by
#                                         tests/docs/CMakeLists.txt.
#   <!-- declarations -->                 prototypes copied from prefrm.h:
#                                         compiled after #include <prefrm.h>,
#                                         so a signature that drifted from
#                                         the header fails to compile.
#
# A block that is none of these fails with its file:line. SANITIZE (e.g.
# "address,undefined", the build's PRM_SANITIZE) is added to the compiler
# and linker flags, so the programs run under the same sanitizers as the
# library. Exit 0 when every block passed, 1 otherwise.
set -uo pipefail

src=${1:?source dir} cc=${2:?C compiler} inc=${3:?include dir} lib=${4:?library}
work=${5:?work dir} sanitize=${6:-}
libdir=$(dirname "$lib")
flags=(-std=c11 -Wall -Wextra -Werror)
if [[ -n $sanitize ]]; then
  flags+=("-fsanitize=$sanitize" -fno-omit-frame-pointer -fno-sanitize-recover=all)
fi

rm -rf "$work"
mkdir -p "$work/blocks"
cd "$src" || exit 1
files=(README.md)
while IFS= read -r f; do files+=("$f"); done < <(find docs -name '*.md' | LC_ALL=C sort)

# 1. Extract: one file per C block, and a manifest line
#    "ID<TAB>KIND<TAB>ARG<TAB>FILE:LINE" (KIND program, excerpt or declarations).
manifest=$work/manifest.tsv
: >"$manifest"
n=0
for md in "${files[@]}"; do
  awk -v md="$md" -v out="$work/blocks" -v first="$n" '
    function marker(line) {
      if (line ~ /^[ \t]*<!--[ \t]*excerpt:[ \t]*[^ \t]+[ \t]*-->[ \t]*$/) {
        sub(/^[ \t]*<!--[ \t]*excerpt:[ \t]*/, "", line)
        sub(/[ \t]*-->[ \t]*$/, "", line)
        kind = "excerpt"; arg = line; return
      }
      if (line ~ /^[ \t]*<!--[ \t]*declarations[ \t]*-->[ \t]*$/) {
        kind = "declarations"; arg = "-"; return
      }
      kind = "program"; arg = "-"
    }
    BEGIN { id = first; inblock = 0; prev = "" }
    {
      if (!inblock) {
        if ($0 ~ /^[ \t]*```/) {
          indent = $0; sub(/```.*$/, "", indent)
          info = $0; sub(/^[ \t]*```[ \t]*/, "", info); sub(/[ \t].*$/, "", info)
          inblock = 1; isc = (info == "c" || info == "C" || info == "h")
          if (isc) {
            id++; path = sprintf("%s/%04d.c", out, id); start = FNR; marker(prev)
            printf "" > path
          }
          next
        }
        prev = $0
        next
      }
      if ($0 ~ /^[ \t]*```[ \t]*$/) {
        inblock = 0
        if (isc) {
          close(path)
          printf "%04d\t%s\t%s\t%s:%d\n", id, kind, arg, md, start
        }
        prev = $0
        next
      }
      if (isc) {
        line = $0
        if (substr(line, 1, length(indent)) == indent) line = substr(line, length(indent) + 1)
        print line > path
      }
    }
    END {
      if (inblock) { printf "%s: unterminated code block\n", md > "/dev/stderr"; exit 1 }
      printf "%d\n", id > (out "/last")
    }
  ' "$md" >>"$manifest" || exit 1
  n=$(cat "$work/blocks/last")
done

# verbatim BLOCK FILE: the block's lines appear in FILE as consecutive lines,
# each prefixed by one common indentation. On failure, name the first block
# line that occurs nowhere in the file (ignoring indentation).
verbatim() {
  awk '
    function trim(s) { sub(/^[ \t]+/, "", s); sub(/[ \t]+$/, "", s); return s }
    FNR == NR { b[++nb] = $0; next }
    { f[++nf] = $0; seen[trim($0)] = 1 }
    END {
      lo = 1; while (lo <= nb && b[lo] ~ /^[ \t]*$/) lo++
      while (nb >= lo && b[nb] ~ /^[ \t]*$/) nb--
      if (lo > nb) { print "    the block is empty"; exit 1 }
      m = nb - lo + 1
      for (i = 1; i + m - 1 <= nf; i++) {
        L = length(f[i]) - length(b[lo])
        if (L < 0 || substr(f[i], L + 1) != b[lo]) continue
        ind = substr(f[i], 1, L)
        if (ind !~ /^[ \t]*$/) continue
        ok = 1
        for (k = 1; k < m && ok; k++) {
          want = b[lo + k]; have = f[i + k]
          if (want ~ /^[ \t]*$/) ok = (have ~ /^[ \t]*$/)
          else ok = (have == ind want)
        }
        if (ok) exit 0
      }
      for (k = lo; k <= nb; k++)
        if (b[k] !~ /^[ \t]*$/ && !(trim(b[k]) in seen)) {
          printf "    block line %d is not in the file: %s\n", k, b[k]; exit 1
        }
      print "    every line is in the file, but not as one run of consecutive lines"
      exit 1
    }
  ' "$1" "$2"
}

# line_directive FILE:LINE: compiler messages point into the markdown file
# (the block starts on the line after its fence).
line_directive() { printf '#line %d "%s"\n' "$((${1##*:} + 1))" "${1%:*}"; }

# 2. Check every block.
fail=0 programs=0 excerpts=0 decls=0
while IFS=$'\t' read -r id kind arg where <&3; do
  block=$work/blocks/$id.c
  case $kind in
    excerpt)
      if [[ $arg != examples/* || ! -f $src/$arg ]]; then
        echo "FAIL $where: excerpt of '$arg', which is not a file under examples/"
        fail=1
        continue
      fi
      if ! grep -qw "$(basename "$arg" .c)" "$src/examples/CMakeLists.txt"; then
        echo "FAIL $where: $arg is not built by examples/CMakeLists.txt"
        fail=1
        continue
      fi
      if out=$(verbatim "$block" "$src/$arg"); then
        echo "ok   $where: excerpt of $arg"
        excerpts=$((excerpts + 1))
      else
        echo "FAIL $where: not found verbatim in $arg"
        printf '%s\n' "$out"
        fail=1
      fi
      ;;
    declarations)
      { echo '#include <prefrm.h>'; line_directive "$where"; cat "$block"; } >"$work/$id-decl.c"
      if out=$("$cc" "${flags[@]}" -I"$inc" -fsyntax-only "$work/$id-decl.c" 2>&1); then
        echo "ok   $where: declarations agree with prefrm.h"
        decls=$((decls + 1))
      else
        echo "FAIL $where: declarations do not compile against prefrm.h"
        printf '%s\n' "$out" | sed 's/^/    /'
        fail=1
      fi
      ;;
    program)
      if ! grep -qE '^[[:space:]]*int[[:space:]]+main[[:space:]]*\(' "$block"; then
        echo "FAIL $where: not a complete program (no main), and no <!-- excerpt: examples/FILE.c -->" \
          "or <!-- declarations --> line just before the fence"
        fail=1
        continue
      fi
      exe=$work/$id
      { line_directive "$where"; cat "$block"; } >"$exe.c"
      if ! out=$("$cc" "${flags[@]}" -I"$inc" -o "$exe" "$exe.c" "$lib" -Wl,-rpath,"$libdir" \
        -lm -lpthread 2>&1); then
        echo "FAIL $where: does not compile"
        printf '%s\n' "$out" | sed 's/^/    /'
        fail=1
        continue
      fi
      mkdir -p "$exe.run"
      start=$(date +%s.%N)
      rc=0
      out=$(cd "$exe.run" && timeout 60 "$exe" 2>&1 </dev/null) || rc=$?
      secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
      if ((rc != 0)); then
        echo "FAIL $where: the program exited with status $rc"
        printf '%s\n' "$out" | tail -n 30 | sed 's/^/    /'
        fail=1
        continue
      fi
      echo "ok   $where: compiled and ran (${secs} s): $(printf '%s\n' "$out" | tail -n 1)"
      programs=$((programs + 1))
      ;;
  esac
done 3<"$manifest"

total=$(wc -l <"$manifest")
echo "C blocks in README.md and docs/: $total; $programs programs compiled and ran," \
  "$excerpts excerpts found in examples/, $decls declaration blocks compiled"
((total > 0)) || { echo "FAIL: no C block found"; exit 1; }
((fail == 0)) || exit 1
rm -rf "$work"
