#!/usr/bin/python3
"""torch_score.py - PyTorch's scoring speed for the gpt2 and llama reward models: the twin of
`bench_train --model gpt2|llama --score`.

torch_ref.py (../shared/reference) has no scoring benchmark, so this script imports it as a module
(importing it runs nothing but `import torch` and definitions) and times

    with torch.no_grad(): model(ids, lengths)

on batches of 2P sequences (what scoring one pair batch costs), for the same configuration, data
shape and thread count as bench_train. Output: a human line and a `JSON {...}` line whose keys
match bench_train's score mode (ms_forward_median, seqs_per_s, forward_flops, gflops_per_s).

  torch_score.py [--ref PATH/torch_ref.py] [--model gpt2|llama]
                 [--vocab 512 --ctx 128 --dim 128 --layers 4 --heads 4]
                 [--batch P] [--seq-len T] [--min-len M] [--seed 0]
                 [--threads N] [--steps S] [--warmup W] [--json-out FILE] [--no-malloc-tune]
  llama:         [--kv-heads G] [--head-dim HD] [--ffn F] [--rope-theta X] [--rms-eps E]
                 [--attn-bias] [--qk-norm]   (torch_ref's flags and defaults; the model is
                 torch_ref's LlamaRM, built by its build_model)

Fairness, as torch_ref's bench does it: OMP/OPENBLAS/MKL_NUM_THREADS are set before torch is
imported, torch.set_num_threads(N), one interop thread, and (unless --no-malloc-tune or already
set) the process re-executes itself with GLIBC_TUNABLES=<torch_ref.MALLOC_TUNABLES value> so
freed tensors stay in the heap instead of being re-mmapped (and page-faulted) on every forward.
Like torch_ref, the FLOP count is the formula's (every position of the padded batch, full T x T
attention): the forward third of torch_ref's training formula (attention width A = D for gpt2,
H * head_dim for llama).
"""

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_REF = os.path.normpath(os.path.join(HERE, "..", "..", "..", "shared", "reference",
                                            "torch_ref.py"))
# Copied from torch_ref.MALLOC_TUNABLES (it cannot be imported before the re-exec: importing
# torch_ref imports torch, and the tunables must be in place when the process starts).
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"


def parse_args(argv):
    ap = argparse.ArgumentParser(description="time torch's no-grad gpt2/llama forward (scoring)")
    ap.add_argument("--ref", default=os.environ.get("TORCH_REF", DEFAULT_REF),
                    help="path of torch_ref.py")
    ap.add_argument("--model", choices=["gpt2", "llama"], default="gpt2")
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=None, help="llama: n_kv_head (default heads)")
    ap.add_argument("--head-dim", type=int, default=None, help="llama: head_dim (default dim/heads)")
    ap.add_argument("--ffn", type=int, default=None, help="llama: SwiGLU width (Meta's rule)")
    ap.add_argument("--rope-theta", type=float, default=None, help="llama: RoPE base (10000)")
    ap.add_argument("--rms-eps", type=float, default=None, help="llama: RMSNorm eps (1e-6)")
    ap.add_argument("--attn-bias", action="store_true", help="llama: Qwen2 q/k/v biases")
    ap.add_argument("--qk-norm", action="store_true", help="llama: Qwen3 q/k RMSNorm")
    ap.add_argument("--batch", type=int, default=16, help="pairs: each forward scores 2P sequences")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--min-len", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20, help="timed forwards")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--no-malloc-tune", action="store_true")
    return ap.parse_args(argv)


ARGS = parse_args(sys.argv[1:])
if not ARGS.no_malloc_tune and "GLIBC_TUNABLES" not in os.environ:
    os.environ["GLIBC_TUNABLES"] = MALLOC_TUNABLES
    os.execv(sys.executable, [sys.executable] + sys.argv)
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = str(ARGS.threads)


def load_torch_ref(path):
    spec = importlib.util.spec_from_file_location("torch_ref", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # imports torch (threads already set above)
    return mod


def main():
    args = ARGS
    ref = load_torch_ref(args.ref)
    torch = ref.torch
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    # torch_ref's own model builder and synthetic batches, from a namespace shaped like its CLI's
    cfg = argparse.Namespace(model=args.model, seed=args.seed, vocab=args.vocab, ctx=args.ctx,
                             dim=args.dim, layers=args.layers, heads=args.heads,
                             seq_len=args.seq_len, min_len=args.min_len, kv_heads=args.kv_heads,
                             head_dim=args.head_dim, ffn=args.ffn, rope_theta=args.rope_theta,
                             rms_eps=args.rms_eps, attn_bias=args.attn_bias,
                             qk_norm=args.qk_norm)
    ref.check_model_flags(cfg)  # llama flags with --model gpt2: an error, as in torch_ref
    if getattr(ref, "MALLOC_TUNABLES", MALLOC_TUNABLES) != MALLOC_TUNABLES:
        print("note: torch_ref.MALLOC_TUNABLES differs from this script's copy", file=sys.stderr)
    P = args.batch
    model = ref.build_model(cfg)
    model.eval()
    g = torch.Generator().manual_seed(args.seed + 1)
    nb = min(args.steps + args.warmup, 8)
    batches = [ref.synth_batch(cfg, P, model, g) for _ in range(nb)]
    times = []
    with torch.no_grad():
        for it in range(args.warmup + args.steps):
            b = batches[it % nb]
            t0 = time.perf_counter()
            r = model(b["ids"], b["lengths"])
            t1 = time.perf_counter()
            if it >= args.warmup:
                times.append(t1 - t0)
    assert r.shape == (2 * P,)
    med = statistics.median(times)
    T = args.seq_len or args.ctx
    train_fl, _, n_all, n_ne = ref.flops_per_step(model, P, T)
    tok = 2 * P * T
    mc = model.config
    width = mc["n_head"] * mc["head_dim"] if args.model == "llama" else args.dim  # attention A
    fl = 2 * n_ne * tok + 4 * args.layers * T * width * tok
    assert 3 * fl == train_fl  # the forward third of torch_ref's training formula
    formula = ("2*N_nonemb*tok + 4*L*T*(H*hd)*tok" if args.model == "llama"
               else "2*N_nonemb*tok + 4*L*T*D*tok")
    res = {
        "impl": "torch", "model": args.model, "mode": "score", "config": model.config,
        "seq_len": T, "min_len": args.min_len or 0, "pairs_per_step": P, "seqs_per_forward": 2 * P,
        "threads": args.threads, "steps": args.steps, "warmup": args.warmup,
        "ms_forward_median": med * 1e3, "ms_forward_min": min(times) * 1e3,
        "ms_forward_mean": statistics.mean(times) * 1e3, "seqs_per_s": 2 * P / med,
        "forward_flops": fl, "gflops_per_s": fl / med * 1e-9,
        "flops_formula": formula + " (forward third of torch_ref's training formula), tok = 2P*T",
        "params": n_all, "params_nonembedding": n_ne, "torch": torch.__version__,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "(unset)"),
        "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", "(unset)"),
    }
    print(f"{args.model} score {2 * P} seqs x {T} tok threads={args.threads}: {med * 1e3:.3f} ms/forward "
          f"(median of {args.steps}), {2 * P / med:.1f} seqs/s, {fl / 1e9:.3f} GFLOP/forward -> "
          f"{fl / med * 1e-9:.1f} GFLOP/s; params {n_all} (non-emb {n_ne})")
    print("JSON " + json.dumps(res))
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
