#!/usr/bin/env python3
"""perf_group.py - where a libprefrm step spends its time, from `perf script`.

    perf record --call-graph dwarf -F 2000 -o perf.data PROGRAM ...
    perf script -i perf.data | tests/bench/perf_group.py --root prm_train_step

Keeps the samples whose stack holds a frame named --root (the step, not the
set-up), and groups them by the innermost libprefrm function on the stack
that is not plumbing (the GEMM wrappers and the parallel-for machinery, which
every phase goes through). Static functions the compiler inlined do not have
frames of their own: a group is named after the function their code ended
up in. Each group is split by what the leaf was: the BLAS kernel, BLAS
packing (copy), other BLAS code, libprefrm's own code, libm/libc, the kernel.

--ms MS converts shares into milliseconds of a step of MS ms.
Standard library only; any python3.
"""
import argparse
import collections
import re
import sys

PLUMBING = re.compile(
    r"^(prmi_gemm|prmi_gemv|prmi_par_for|prmi_par_range|prmi_par_gemm|prmi_par_colsum|"
    r"range_task|gemm_task|prm_pool_parallel_for|pool_run|pool_thread|"
    # leaf helpers shared by many phases: the phase that called them names the group
    r"lanes_sum|max_n|sum_n|dot_n|sqdev_n|prmi_exp_shifted\w*|exp_clipped|prmi_act_\w*|gelu_\w+|"
    r"__mem\w+)$")


def leaf_kind(sym, dso):
    if "blas" in dso:
        if "kernel" in sym:
            return "blas kernel"
        if "copy" in sym:
            return "blas packing"
        return "blas other"
    if "libprefrm" in dso:
        return "own code"
    if "kernel" in dso or dso.startswith("["):
        return "kernel"
    return "libc/libm"


def resolve_inlined(frames):
    """perf prints inlined functions as frames of dso "inlined": give each the
    dso of the real frame that contains it (the next one outwards)."""
    dso = None
    out = []
    for sym, d in reversed(frames):
        if d != "inlined":
            dso = d
        out.append((sym, dso or d))
    return out[::-1]


def samples(lines):
    frames = []
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            if frames:
                yield resolve_inlined(frames)
            frames = []
            continue
        if not line.startswith((" ", "\t")):
            frames = []  # a sample header
            continue
        m = re.match(r"\s*[0-9a-f]+\s+(.*?)\s+\((.*)\)\s*$", line)
        if not m:
            continue
        sym = re.sub(r"\+0x[0-9a-f]+$", "", m.group(1))
        sym = re.sub(r"\.(avx2|avx512f|default|arch_\w+)$", "", sym)  # target clones
        frames.append((sym, m.group(2)))
    if frames:
        yield resolve_inlined(frames)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="prm_train_step",
                    help="keep samples with this function on the stack")
    ap.add_argument("--ms", type=float, default=0.0, help="step time, for a ms column")
    ap.add_argument("--min", type=float, default=0.3, help="hide groups below this %%")
    a = ap.parse_args()

    groups = collections.Counter()
    kinds = collections.defaultdict(collections.Counter)
    total = kept = 0
    for frames in samples(sys.stdin):
        total += 1
        if not any(s == a.root for s, _ in frames):
            continue
        kept += 1
        group = None
        for sym, dso in frames:  # innermost first
            if "libprefrm" in dso and not PLUMBING.match(sym):
                group = sym
                break
        group = group or "(no libprefrm frame)"
        groups[group] += 1
        kinds[group][leaf_kind(*frames[0])] += 1
    if kept == 0:
        sys.exit(f"perf_group: no sample has {a.root} on its stack ({total} samples)")
    print(f"{kept} of {total} samples under {a.root}")
    head = f"{'group':34} {'%':>6}" + (f" {'ms':>7}" if a.ms else "") + "  leaves"
    print(head)
    for g, n in groups.most_common():
        pct = 100.0 * n / kept
        if pct < a.min:
            continue
        split = ", ".join(f"{k} {100.0 * c / kept:.1f}" for k, c in kinds[g].most_common())
        ms = f" {a.ms * n / kept:7.1f}" if a.ms else ""
        print(f"{g:34} {pct:6.1f}{ms}  {split}")
    by_kind = collections.Counter()
    for g in kinds:
        by_kind.update(kinds[g])
    print("all: " + ", ".join(f"{k} {100.0 * c / kept:.1f}" for k, c in by_kind.most_common()))


if __name__ == "__main__":
    main()
