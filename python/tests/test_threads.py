"""Scoring from several Python threads through one model.

ctypes releases the GIL for the duration of every foreign call, and the
library lets any number of contexts share a model, so threads that each own
an inference context score in parallel. This test checks the results and
measures the speed-up of 2 threads over 1 (same total work); the number is
printed, not asserted, because it depends on the machine's free cores.
"""
import os
import threading
import time

import numpy as np

import prefrm

ROWS, D, H, CALLS = 64, 256, [256, 256], 160


def _score(model, x, calls, out):
    with model.context(ROWS, inference=True) as ctx:
        s = np.empty(ROWS, np.float32)
        for _ in range(calls):
            ctx.forward(x, out=s)
        out.append(s.copy())


def _run(model, x, n_threads):
    outs = []
    threads = [threading.Thread(target=_score, args=(model, x, CALLS // n_threads, outs))
               for _ in range(n_threads)]
    t0, c0 = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return wall, outs, (time.process_time() - c0) / wall


def test_two_threads_score_one_model(capsys):
    x = np.random.default_rng(0).standard_normal((ROWS, D)).astype(np.float32)
    with prefrm.Model("mlp", input_size=D, hidden=H, seed=4) as m:
        _run(m, x, 1)  # warm up
        t1 = min(_run(m, x, 1)[0] for _ in range(3))
        best, cpu = None, 0.0
        for _ in range(3):
            t2, outs, busy = _run(m, x, 2)
            if best is None or t2 < best:
                best, cpu = t2, busy
            assert len(outs) == 2
            for s in outs:
                np.testing.assert_array_equal(s, outs[0])
        speedup = t1 / best
    with capsys.disabled():
        print(f"\n[prefrm threads] {CALLS} forwards of {ROWS}x{D} rows through mlp "
              f"{D}-{H[0]}-{H[1]}-1: 1 thread {t1 * 1e3:.1f} ms, 2 threads "
              f"{best * 1e3:.1f} ms, speed-up {speedup:.2f}x (CPU/wall during 2 threads "
              f"{cpu:.2f}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    assert speedup > 0
