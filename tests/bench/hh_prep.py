#!/usr/bin/python3
"""hh_prep.py - the token data of the HH-RLHF speed benchmarks (hh_bench.sh), written once so that
libprefrm (bench_hh) and PyTorch (torch_hh.py) see identical tokens.

  hh_prep.py --out FILE [--data DIR] [--ctx 1024] [--seed 0] [--groups 64] [--group-size 8]
             [--max-response 0] [--batch 16]

Input: the three helpful HH-RLHF test files of DIR (default <repo>/../shared/data/hh-rlhf), pooled
in this order: helpful-base, helpful-online, helpful-rejection-sampled (keys prompt, chosen,
rejected). Nothing of them is copied into the repository; FILE goes wherever the caller says
(hh_bench.sh: a temporary folder).

Tokens are bytes: id = UTF-8 byte, vocabulary 256. Context CTX (1024):

  Pairs (training). sequence = prompt + response. When prompt + the longer response exceeds CTX,
  the prompt loses its START, identically for chosen and rejected (so the pair still shares it);
  a response alone longer than CTX keeps its first CTX bytes and gets no prompt (the other
  response of the pair then gets none either). Every pair is written, in the order of a fixed
  shuffle (random.Random(seed).shuffle of the pooled record indices): training step k uses pairs
  k*P .. k*P+P-1 of the file.

  Groups (scoring rollouts). `groups` prompts drawn without replacement from the pooled records
  and, for each, `group-size` responses drawn without replacement from the pool of every chosen
  and rejected response (random.Random(seed + 1)). The same rule at CTX: the prompt loses its
  start so that the longest of its responses fits; a response longer than CTX keeps its first CTX
  bytes and the group gets no prompt. --max-response R (default 0: off) first cuts every drawn
  response to its first R bytes, as a generation limit (max_new_tokens) would; then the prompt
  keeps at least CTX - R bytes.

File layout (little-endian; read by read_tokens below and by bench_hh.c):
  8 bytes   magic "PRMHH001"
  6 x u32   ctx, n_pairs, n_groups, group_size, seed, reserved (0)
  n_pairs x { u32 len_chosen, u32 len_rejected, u32 prompt_len, bytes chosen, bytes rejected }
  n_groups x { u32 prompt_len, group_size x u32 len, the bytes of each sequence in turn }
(prompt_len: bytes of prompt kept, for information: the sequences already contain them.)

Besides the file, prints one human line and a `JSON {...}` line about the whole pooled data: the
token ratios padded/packed (batches of --batch consecutive pairs of the shuffle, each padded to
its longest row, as Hugging Face trainers do) and packed/shared (each pair's common start counted
once), to compare with the same ratios over the timed steps.

Importing this module runs nothing (torch_hh.py imports it for read_tokens).
"""

import argparse
import json
import os
import random
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.normpath(os.path.join(HERE, "..", "..", "..", "shared", "data", "hh-rlhf"))
FILES = ("helpful-base-test.jsonl", "helpful-online-test.jsonl",
         "helpful-rejection-sampled-test.jsonl")
MAGIC = b"PRMHH001"
HEADER = struct.Struct("<6I")


def load_records(data_dir):
    recs = []
    for name in FILES:
        path = os.path.join(data_dir, name)
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    recs.append((r["prompt"].encode("utf-8"), r["chosen"].encode("utf-8"),
                                 r["rejected"].encode("utf-8")))
    return recs


def fit(prompt, responses, ctx):
    """The truncation rule: the prompt keeps its last bytes so that prompt + the longest response
    fits in ctx; a response longer than ctx keeps its first ctx bytes (no prompt then).
    Returns (kept prompt, [prompt + response, ...])."""
    longest = max(len(r) for r in responses)
    if longest >= ctx:
        prompt = b""
    elif len(prompt) + longest > ctx:
        prompt = prompt[len(prompt) - (ctx - longest):]
    return prompt, [prompt + r[:ctx] for r in responses]


def lcp(a, b):
    """Length of the longest common prefix of two byte strings."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def make_pairs(recs, ctx, seed):
    order = list(range(len(recs)))
    random.Random(seed).shuffle(order)
    pairs = []
    for i in order:
        p, c, r = recs[i]
        kept, (sc, sr) = fit(p, [c, r], ctx)
        pairs.append((len(kept), sc, sr))
    return pairs


def make_groups(recs, ctx, seed, n_groups, group_size, max_response=0):
    rng = random.Random(seed + 1)
    pool = [c for _, c, _ in recs] + [r for _, _, r in recs]
    groups = []
    for i in rng.sample(range(len(recs)), n_groups):
        resp = [pool[j] for j in rng.sample(range(len(pool)), group_size)]
        if max_response > 0:
            resp = [r[:max_response] for r in resp]
        kept, seqs = fit(recs[i][0], resp, ctx)
        groups.append((len(kept), seqs))
    return groups


def write_tokens(path, ctx, seed, pairs, groups, group_size):
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(HEADER.pack(ctx, len(pairs), len(groups), group_size, seed, 0))
        for plen, sc, sr in pairs:
            f.write(struct.pack("<3I", len(sc), len(sr), plen))
            f.write(sc)
            f.write(sr)
        for plen, seqs in groups:
            f.write(struct.pack("<%dI" % (1 + group_size), plen, *[len(s) for s in seqs]))
            for s in seqs:
                f.write(s)


def read_tokens(path, n_pairs=None, n_groups=None):
    """Read a file of write_tokens: (header dict, pairs [(prompt_len, chosen, rejected)],
    groups [(prompt_len, [seq, ...])]); sequences as bytes. Only the first n_pairs pairs
    (default all) are returned; groups are read only when n_groups is not 0 (None: all)."""
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise SystemExit(f"{path}: not a token file of hh_prep.py")
        ctx, np_, ng, gs, seed, _ = HEADER.unpack(f.read(HEADER.size))
        hdr = {"ctx": ctx, "n_pairs": np_, "n_groups": ng, "group_size": gs, "seed": seed}
        want_p = np_ if n_pairs is None else n_pairs
        if want_p > np_:
            raise SystemExit(f"{path}: {want_p} pairs wanted, the file has {np_}")
        pairs = []
        for k in range(np_):
            lc, lr, plen = struct.unpack("<3I", f.read(12))
            if k < want_p:
                pairs.append((plen, f.read(lc), f.read(lr)))
            elif n_groups == 0:
                break
            else:
                f.seek(lc + lr, os.SEEK_CUR)
        groups = []
        want_g = ng if n_groups is None else n_groups
        if want_g > ng:
            raise SystemExit(f"{path}: {want_g} groups wanted, the file has {ng}")
        for _ in range(want_g):
            hd = struct.unpack("<%dI" % (1 + gs), f.read(4 * (1 + gs)))
            groups.append((hd[0], [f.read(n) for n in hd[1:]]))
        return hdr, pairs, groups


def data_ratios(pairs, P):
    """Token counts over every whole batch of P consecutive pairs: padded (2P x longest row of
    the batch), packed (sum of lengths), shared (packed less each pair's common start)."""
    padded = packed = shared = 0
    nb = len(pairs) // P
    for b in range(nb):
        batch = pairs[b * P:(b + 1) * P]
        T = max(max(len(c), len(r)) for _, c, r in batch)
        padded += 2 * P * T
        for _, c, r in batch:
            packed += len(c) + len(r)
            shared += len(c) + len(r) - lcp(c, r)
    return {"batches": nb, "pairs": nb * P, "padded": padded, "packed": packed, "shared": shared,
            "padded_over_packed": padded / packed, "packed_over_shared": packed / shared}


def main(argv):
    ap = argparse.ArgumentParser(description="write the token file of hh_bench.sh")
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default=os.environ.get("HH_DATA", DEFAULT_DATA))
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--groups", type=int, default=64, help="scoring prompts")
    ap.add_argument("--group-size", type=int, default=8, help="responses per prompt")
    ap.add_argument("--max-response", type=int, default=0,
                    help="scoring: cut each response to its first R bytes first (0: off)")
    ap.add_argument("--batch", type=int, default=16, help="pairs per batch, for the ratios")
    args = ap.parse_args(argv)
    for name in FILES:
        if not os.path.isfile(os.path.join(args.data, name)):
            raise SystemExit(f"hh_prep: {os.path.join(args.data, name)} not found")
    recs = load_records(args.data)
    pairs = make_pairs(recs, args.ctx, args.seed)
    groups = make_groups(recs, args.ctx, args.seed, args.groups, args.group_size,
                         args.max_response)
    write_tokens(args.out, args.ctx, args.seed, pairs, groups, args.group_size)
    rat = data_ratios(pairs, args.batch)
    n_resp = args.groups * args.group_size
    g_tok = sum(len(s) for _, seqs in groups for s in seqs)
    g_prompt = sum(p for p, _ in groups)
    res = {"records": len(recs), "ctx": args.ctx, "seed": args.seed, "batch": args.batch,
           "whole_data": rat, "groups": args.groups, "group_size": args.group_size,
           "max_response": args.max_response, "group_tokens_per_response": g_tok / n_resp,
           "group_prompt_mean": g_prompt / args.groups,
           "groups_without_prompt": sum(1 for p, _ in groups if p == 0),
           "pairs_truncated": sum(1 for _, c, r in pairs if max(len(c), len(r)) == args.ctx)}
    print(f"hh_prep: {len(recs)} pairs pooled; whole data in batches of {args.batch}: "
          f"padded/packed {rat['padded_over_packed']:.3f}, packed/shared "
          f"{rat['packed_over_shared']:.3f}; {args.groups} prompts x {args.group_size} responses, "
          f"{g_tok / n_resp:.0f} tokens per response (prompt kept: {g_prompt / args.groups:.0f} "
          f"on average, none in {res['groups_without_prompt']} groups)")
    print("JSON " + json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
