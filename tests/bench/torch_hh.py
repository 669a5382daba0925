#!/usr/bin/python3
"""torch_hh.py - PyTorch's side of the HH-RLHF speed benchmarks (hh_bench.sh): torch_ref's gpt2
reward model fed the way Hugging Face trainers feed it, on the token file of hh_prep.py (the same
tokens bench_hh reads).

  torch_hh.py init  --out MODEL.safetensors [--seed 0]
  torch_hh.py train --data FILE [--init MODEL] [--batch 16] [--warmup 3] [--steps 20] [--lr 1e-4]
  torch_hh.py score --data FILE [--init MODEL] [--prompts-per-call 1] [--warmup 2]
  common:           [--ref PATH/torch_ref.py] [--threads 1] [--seed 0] [--json-out FILE]
                    [--no-malloc-tune]

The model: torch_ref's GPT2RM, gpt2-tiny shaped for bytes (vocabulary 256, 1024 positions, width
128, 4 layers, 4 heads), built by torch_ref.build_model with --seed, or loaded from --init (a
checkpoint written by `init`: torch_ref's rm layout, which libprefrm's prm_model_load reads, so
both sides start from the same parameters).

train: step k takes pairs kP .. kP+P-1 of the file; chosen and rejected are padded (id 0) to the
  longest sequence of the batch and go through ONE forward of 2P rows, each scored at its last real
  token (torch_ref's forward with lengths); loss = -logsigmoid(r_c - r_r).mean() (torch_ref's
  bt_loss), backward, AdamW step (torch_ref's make_optimizer: lr, betas 0.9/0.999, eps 1e-8, no
  decay, no clipping). Timed as torch_ref's bench times a step: zero_grad(set_to_none) + forward +
  loss + backward + step. W warm-up steps, then S timed; pairs/s = P / median step time.
score: each call is `with torch.no_grad(): model(ids, lengths)` on G prompts' 8 responses, padded
  to the call's longest row. W calls on the first batches warm up; then every batch is scored once,
  timed; responses/s = responses / total time of the calls.

Tokens computed: every position of the padded rows (2P x longest per step; rows x longest per
call). Peak RSS: resource.getrusage ru_maxrss of this process. Batches are built before timing.

Fairness, as tests/bench/torch_score.py and torch_ref's bench do it: OMP/OPENBLAS/MKL_NUM_THREADS
are set before torch is imported, torch.set_num_threads(N) and one interop thread, and (unless
--no-malloc-tune or already set) the process re-executes itself with GLIBC_TUNABLES set to
torch_ref's MALLOC_TUNABLES, so freed tensors stay in the heap instead of being re-mmapped and
page-faulted every step.
"""

import argparse
import importlib.util
import json
import os
import resource
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_REF = os.path.normpath(os.path.join(HERE, "..", "..", "..", "shared", "reference",
                                            "torch_ref.py"))
# torch_ref.MALLOC_TUNABLES, copied: the tunables must be in place when the process starts, before
# torch_ref (which imports torch) can be imported. Compared with torch_ref's value after import.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"


def parse_args(argv):
    ap = argparse.ArgumentParser(description="time torch_ref's gpt2 on the HH-RLHF token file")
    ap.add_argument("cmd", choices=["init", "train", "score"])
    ap.add_argument("--data", help="token file of hh_prep.py (train, score)")
    ap.add_argument("--out", help="init: the checkpoint to write")
    ap.add_argument("--init", help="train, score: start from this checkpoint")
    ap.add_argument("--ref", default=os.environ.get("TORCH_REF", DEFAULT_REF),
                    help="path of torch_ref.py")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16, help="train: pairs per step")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps/calls (3 / 2)")
    ap.add_argument("--steps", type=int, default=20, help="train: timed steps")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--prompts-per-call", type=int, default=1, help="score: prompts per forward")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--no-malloc-tune", action="store_true")
    a = ap.parse_args(argv)
    if a.cmd == "init" and not a.out:
        ap.error("init needs --out")
    if a.cmd != "init" and not a.data:
        ap.error(f"{a.cmd} needs --data")
    if a.warmup is None:
        a.warmup = 3 if a.cmd == "train" else 2
    return a


ARGS = parse_args(sys.argv[1:])
if ARGS.cmd != "init" and not ARGS.no_malloc_tune and "GLIBC_TUNABLES" not in os.environ:
    os.environ["GLIBC_TUNABLES"] = MALLOC_TUNABLES
    os.execv(sys.executable, [sys.executable] + sys.argv)
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = str(ARGS.threads)

sys.dont_write_bytecode = True  # no __pycache__ next to the sources
sys.path.insert(0, HERE)
import hh_prep  # noqa: E402  (reads the token file; imports no torch)


def load_torch_ref(path):
    if not os.path.isfile(path):
        raise SystemExit(f"torch_hh: {path} not found (TORCH_REF or --ref)")
    spec = importlib.util.spec_from_file_location("torch_ref", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # imports torch: the thread variables are already set
    return mod


def model_config(seed):
    """torch_ref's CLI namespace for gpt2-tiny over bytes at context 1024."""
    return argparse.Namespace(model="gpt2", seed=seed, vocab=256, ctx=1024, dim=128, layers=4,
                              heads=4, seq_len=None, min_len=None, kv_heads=None, head_dim=None,
                              ffn=None, rope_theta=None, rms_eps=None, attn_bias=False,
                              qk_norm=False)


def make_model(ref, args):
    if args.init:
        return ref.model_from_state(*ref.read_safetensors(args.init))
    return ref.build_model(model_config(args.seed))


def padded_batch(torch, seqs):
    """Right-padded ids [N, T] (pad id 0, never read: causal attention, scored at length-1) with T
    the longest row, and the lengths [N]."""
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.frombuffer(bytearray(s), dtype=torch.uint8).long()
    return ids, torch.tensor([len(s) for s in seqs], dtype=torch.long)


def peak_rss_kb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux


def emit(res, human, json_out):
    print(human)
    print("JSON " + json.dumps(res))
    if json_out:
        with open(json_out, "a") as f:
            f.write(json.dumps(res) + "\n")


def cmd_init(ref, args):
    model = ref.build_model(model_config(args.seed))
    tensors, meta = ref.checkpoint_tensors(model)  # rm layout + config metadata
    ref.write_safetensors(args.out, tensors, meta)
    print(f"torch_hh: wrote {args.out} (gpt2 256/1024/128x4x4, seed {args.seed}, "
          f"{sum(p.numel() for p in model.parameters())} parameters)")
    return 0


def cmd_train(ref, torch, args):
    P, W, S = args.batch, args.warmup, args.steps
    _, pairs, _ = hh_prep.read_tokens(args.data, n_pairs=(W + S) * P, n_groups=0)
    batches = []
    for k in range(W + S):
        chunk = pairs[k * P:(k + 1) * P]
        ids, lengths = padded_batch(torch, [c for _, c, _ in chunk] + [r for _, _, r in chunk])
        batches.append((ids, lengths))
    model = make_model(ref, args)
    model.train()
    opt = ref.make_optimizer(model, args.lr, 0.0, False)
    times, losses = [], []
    rss_setup = peak_rss_kb()
    for k, (ids, lengths) in enumerate(batches):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        r = model(ids, lengths)
        loss = ref.bt_loss(r[:P], r[P:])
        loss.backward()
        opt.step()
        t1 = time.perf_counter()
        times.append(t1 - t0)
        losses.append(loss.item())
    timed = times[W:]
    med = statistics.median(timed)
    padded = sum(ids.numel() for ids, _ in batches[W:])
    packed = sum(int(lengths.sum()) for _, lengths in batches[W:])
    rss = peak_rss_kb()
    tpp = padded / (S * P)
    res = {
        "impl": "torch", "mode": "train", "variant": "padded", "config": model.config,
        "params": sum(p.numel() for p in model.parameters()), "ctx": 1024, "pairs_per_step": P,
        "steps": S, "warmup": W, "lr": args.lr, "threads": str(args.threads),
        "ms_step_median": med * 1e3, "ms_step_min": min(timed) * 1e3,
        "ms_step_mean": statistics.mean(timed) * 1e3, "pairs_per_s": P / med,
        "tokens_computed": padded, "tokens_per_pair": tpp, "padded_tokens": padded,
        "packed_tokens": packed, "peak_rss_kb": rss, "rss_after_setup_kb": rss_setup,
        "losses": losses, "ms_steps": [round(t * 1e3, 2) for t in times],
        "torch": torch.__version__, "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", "(unset)"),
    }
    emit(res, f"torch train padded: {P} pairs/step, {S} timed steps (+{W} warm-up), threads "
              f"{args.threads}: {med * 1e3:.1f} ms/step (median), {P / med:.3f} pairs/s, "
              f"{tpp:.1f} tokens computed per pair, loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
              f"peak RSS {rss / 1024:.1f} MiB", args.json_out)
    return 0


def cmd_score(ref, torch, args):
    hdr, _, groups = hh_prep.read_tokens(args.data, n_pairs=0)
    G, K = args.prompts_per_call, hdr["group_size"]
    if len(groups) % G:
        raise SystemExit(f"torch_hh: --prompts-per-call {G} does not divide {len(groups)} prompts")
    batches = []
    for k in range(len(groups) // G):
        batches.append(padded_batch(torch, [s for _, seqs in groups[k * G:(k + 1) * G]
                                            for s in seqs]))
    model = make_model(ref, args)
    model.eval()
    times, first = [], None
    with torch.no_grad():
        for k in range(args.warmup):
            ids, lengths = batches[k % len(batches)]
            model(ids, lengths)
        rss_setup = peak_rss_kb()
        for ids, lengths in batches:
            t0 = time.perf_counter()
            r = model(ids, lengths)
            t1 = time.perf_counter()
            times.append(t1 - t0)
            if first is None:
                first = r.tolist()
    total = sum(times)
    n_resp = len(groups) * K
    padded = sum(ids.numel() for ids, _ in batches)
    packed = sum(int(lengths.sum()) for _, lengths in batches)
    rss = peak_rss_kb()
    med = statistics.median(times)
    res = {
        "impl": "torch", "mode": "score", "variant": "padded", "config": model.config,
        "params": sum(p.numel() for p in model.parameters()), "ctx": hdr["ctx"],
        "prompts": len(groups), "group_size": K, "rows_per_call": G * K, "calls": len(batches),
        "warmup": args.warmup, "threads": str(args.threads), "ms_call_median": med * 1e3,
        "s_total": total, "responses_per_s": n_resp / total, "tokens_computed": padded,
        "tokens_per_response": padded / n_resp, "padded_tokens": padded, "packed_tokens": packed,
        "peak_rss_kb": rss, "rss_after_setup_kb": rss_setup, "scores_first": first,
        "torch": torch.__version__, "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", "(unset)"),
    }
    emit(res, f"torch score padded: {len(groups)} prompts x {K} responses, {G * K} rows per call, "
              f"threads {args.threads}: {med * 1e3:.1f} ms/call (median), {n_resp / total:.2f} "
              f"responses/s, {padded / n_resp:.1f} tokens computed per response, peak RSS "
              f"{rss / 1024:.1f} MiB", args.json_out)
    return 0


def main():
    args = ARGS
    ref = load_torch_ref(args.ref)
    torch = ref.torch
    if getattr(ref, "MALLOC_TUNABLES", MALLOC_TUNABLES) != MALLOC_TUNABLES:
        print("torch_hh: note: torch_ref.MALLOC_TUNABLES differs from this script's copy",
              file=sys.stderr)
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    if args.cmd == "init":
        return cmd_init(ref, args)
    if args.cmd == "train":
        return cmd_train(ref, torch, args)
    return cmd_score(ref, torch, args)


if __name__ == "__main__":
    sys.exit(main())
