#!/usr/bin/python3
"""gpt2_train_ref.py - multi-step PyTorch training reference for tests/test_parity_gpt2.c.

torch_ref.py (../shared/reference) computes one step (`grads`); this script
trains for several steps with exactly its model, loss and optimizer, so the C
library's prm_train_step loop can be compared loss by loss.

  gpt2_train_ref.py --torch-ref PATH/torch_ref.py --ckpt ckpt.safetensors \
      --batches batches.json --steps 50 [--lr 1e-3 --weight-decay 0.01 \
      --max-grad-norm 1.0 --no-decay-1d]

batches.json: {"batches": [b_0, b_1, ...]}, each b_k a batch object in
torch_ref's batch.json format (chosen/rejected ids, lengths, optional margin,
label, center_rewards_coefficient). Step s uses b_{s mod K}.

Each step: zero grads, forward_pairs, bt_loss, backward, optional
clip_grad_norm_, AdamW step (torch_ref.make_optimizer, created once, so its
moments persist across steps). The loss recorded for step s is the loss of
the forward of step s (before its update), as prm_train_step reports it.

Prints one JSON line on stdout: {"losses": [...], "grad_norms": [...]}
(grad norm before clipping).
"""

import argparse
import importlib.util
import json
import os
import sys
import tempfile


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--torch-ref", required=True, help="path of torch_ref.py")
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--batches", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--max-grad-norm", type=float, default=0.0, help="0 = no clipping")
    ap.add_argument("--no-decay-1d", action="store_true")
    return ap.parse_args(argv)


def import_torch_ref(path):
    """Import torch_ref.py as a module. Its argument parsing and re-exec live
    under `if __name__ == "__main__"`, so importing it under another name only
    defines functions (and imports torch)."""
    spec = importlib.util.spec_from_file_location("prm_torch_ref", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_batches(ref, path, model):
    """Each batch through torch_ref.load_batch (via a temporary file), so the
    padding and defaults are exactly those of the `grads` command."""
    with open(path) as f:
        raw = json.load(f)["batches"]
    out = []
    fd, tmp = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        for b in raw:
            with open(tmp, "w") as f:
                json.dump(b, f)
            out.append(ref.load_batch(tmp, model))
    finally:
        os.remove(tmp)
    return out


def main():
    args = parse_args(sys.argv[1:])
    for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[v] = "1"
    ref = import_torch_ref(args.torch_ref)
    torch = ref.torch
    torch.set_num_threads(1)

    sd, meta = ref.read_safetensors(args.ckpt)
    model = ref.model_from_state(sd, meta)
    model.train()
    batches = load_batches(ref, args.batches, model)
    if not batches:
        raise SystemExit("no batches")
    params = list(model.parameters())
    opt = ref.make_optimizer(model, args.lr, args.weight_decay, args.no_decay_1d)

    losses, norms = [], []
    for step in range(args.steps):
        batch, margin, label, center = batches[step % len(batches)]
        opt.zero_grad(set_to_none=True)
        r_c, r_r = ref.forward_pairs(model, batch)
        loss = ref.bt_loss(r_c, r_r, margin, label, center)
        loss.backward()
        norms.append(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)).item())
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        opt.step()
        losses.append(float(loss.item()))
    print(json.dumps({"losses": losses, "grad_norms": norms}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
