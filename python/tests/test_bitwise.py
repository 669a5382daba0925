"""Training through Python gives, bit for bit, what the same steps in C give."""
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import prefrm

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def c_reference(tmp_path_factory, libpath):
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        pytest.skip("no C compiler")
    libdir = str(Path(libpath).resolve().parent)
    exe = tmp_path_factory.mktemp("cref") / "c_reference"
    subprocess.run([cc, "-O1", "-std=c99", "-I", str(HERE.parent.parent / "include"),
                    str(HERE / "c_reference.c"), "-o", str(exe), "-L", libdir,
                    f"-Wl,-rpath,{libdir}", "-l:" + Path(libpath).name],
                   check=True)
    return exe


@pytest.mark.parametrize("arch,hidden", [("linear", 0), ("mlp", 12)])
def test_python_training_equals_c(c_reference, tmp_path, arch, hidden):
    d, seed, steps, P = 6, 1234, 12, 5
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((steps, 2 * P, d)).astype(np.float32)
    x[:, :P, 0] += 1.0  # chosen rows lean one way so there is signal
    data = tmp_path / "data.bin"
    with open(data, "wb") as f:
        f.write(np.array([2 if hidden else 1, d, hidden, seed, steps, P], "<u4").tobytes())
        f.write(x.astype("<f4").tobytes())
    subprocess.run([str(c_reference), str(data), str(tmp_path / "c.safetensors"),
                    str(tmp_path / "c.opt")], check=True)

    opts = dict(input_size=d, seed=seed)
    if hidden:
        opts["hidden"] = [hidden]
    with prefrm.Model(arch, **opts) as m, m.context(2 * P) as ctx, \
            m.optimizer(lr=1e-2) as opt:
        for s in range(steps - 1):
            ctx.train_step(opt, x[s], center_coef=0.01)
        sc = ctx.forward(x[steps - 1])
        _, _, dc, dr = prefrm.loss_bt(sc[:P], sc[P:], center_coef=0.01)
        ctx.backward(np.concatenate([dc, dr]))
        opt.step(ctx)
        m.save(tmp_path / "py.safetensors")
        opt.save(tmp_path / "py.opt")
        py_params = m.params()

    with prefrm.Model.load(tmp_path / "c.safetensors") as cm:
        c_params = cm.params()
    assert py_params.tobytes() == c_params.tobytes(), "parameters differ bitwise"
    assert (tmp_path / "py.safetensors").read_bytes() == (tmp_path / "c.safetensors").read_bytes()
    assert (tmp_path / "py.opt").read_bytes() == (tmp_path / "c.opt").read_bytes()
