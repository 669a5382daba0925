"""Every error path raises the right exception, before or from the C call."""
import numpy as np
import pytest

import prefrm


@pytest.fixture
def model():
    with prefrm.Model("mlp", input_size=4, hidden=[5], seed=3) as m:
        yield m


def feats(n, d=4):
    return np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)


def test_bad_dtype_shape_contiguity(model):
    with model.context(8) as ctx:
        with pytest.raises(TypeError, match="float32"):
            ctx.forward(feats(4).astype(np.float64))
        with pytest.raises(TypeError):
            ctx.forward([[1.0, 2.0, 3.0, 4.0]])
        with pytest.raises(ValueError, match="2-D"):
            ctx.forward(feats(4).ravel())
        with pytest.raises(ValueError, match="contiguous"):
            ctx.forward(np.asfortranarray(feats(4, 4)))
        with pytest.raises(ValueError, match="contiguous"):
            ctx.forward(feats(4, 8)[:, ::2])
        # row-strided arrays are fine (prm_batch.row_stride), no copy
        wide = feats(4, 6)
        np.testing.assert_array_equal(ctx.forward(wide[:, :4]),
                                      ctx.forward(np.ascontiguousarray(wide[:, :4])))
        with pytest.raises(TypeError, match="float32"):
            ctx.forward(feats(4), out=np.empty(4, np.float64))
        with pytest.raises(ValueError, match="at least 4"):
            ctx.forward(feats(4), out=np.empty(3, np.float32))
        ro = np.empty(4, np.float32)
        ro.flags.writeable = False
        with pytest.raises(ValueError, match="read-only"):
            ctx.forward(feats(4), out=ro)
        with pytest.raises(ValueError):
            ctx.backward(np.zeros((2, 2), np.float32))
        with pytest.raises(TypeError):
            prefrm.loss_bt(np.zeros(3, np.float32), np.zeros(3, np.int32))
        with pytest.raises(ValueError, match="3 elements"):
            prefrm.loss_bt(np.zeros(3, np.float32), np.zeros(2, np.float32))
        with pytest.raises(ValueError, match="2 elements"):
            ctx.evaluate(feats(4), margin=np.zeros(3, np.float32))


def test_library_status_errors_carry_name_and_message(model):
    with model.context(4) as ctx:
        with pytest.raises(prefrm.SizeError) as e:
            ctx.forward(feats(5))  # more rows than max_rows
        assert e.value.status == -3 and e.value.status_name.startswith("PRM_ERR_SIZE")
        assert e.value.message and e.value.message == prefrm.last_errmsg()
        assert ctx.errmsg == e.value.message
        with pytest.raises(prefrm.SizeError):
            ctx.forward(feats(2, 3))  # wrong feature count
        bad = feats(2)
        bad[1, 2] = np.nan
        with pytest.raises(prefrm.NonfiniteError) as e:
            ctx.forward(bad)
        assert "PRM_ERR_NONFINITE" in str(e.value)
        with pytest.raises(prefrm.StateError):
            ctx.backward(np.zeros(2, np.float32))  # no forward pending
        with pytest.raises(prefrm.SizeError):
            ctx.evaluate(feats(3))  # odd pair batch
    with model.context(4, inference=True) as ictx:
        with pytest.raises(prefrm.StateError):
            ictx.zero_grad()
        with pytest.raises(prefrm.StateError):
            ictx.grads_view()
    with pytest.raises(prefrm.InvalidError) as e:
        prefrm.Model("mlp", input_size=4, hidden=[0])
    assert e.value.message
    with pytest.raises(prefrm.InvalidError):
        model.optimizer(lr=-1.0)
    with pytest.raises(prefrm.InvalidError):
        model.set_trainable(5)
    assert model.errmsg  # the model's own message was written too
    with pytest.raises(prefrm.InvalidError):
        prefrm.loss_bt(np.zeros(2, np.float32), np.zeros(2, np.float32),
                       label=np.array([2, 0], np.float32))
    with pytest.raises(prefrm.InvalidError):
        model.tensor_info(99)
    with pytest.raises(prefrm.InvalidError):
        model.find_tensor("nope")
    with pytest.raises(prefrm.NonfiniteError):
        model.write_params(np.array([np.inf], np.float32))
    with pytest.raises(prefrm.SizeError):
        model.params(offset=model.num_params, n=1)
    with pytest.raises(prefrm.StateError):
        model.reward_norm()


def test_io_and_format_errors(model, tmp_path):
    with pytest.raises(prefrm.PrmIOError):
        prefrm.Model.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk").write_bytes(b"hello, not a model")
    with pytest.raises(prefrm.FormatError, match="not a safetensors file"):
        prefrm.Model.load(tmp_path / "junk")
    with pytest.raises(prefrm.FormatError):
        prefrm.Model.from_bytes(b"\x00" * 3)
    with pytest.raises(prefrm.PrmIOError):
        model.save(tmp_path / "no" / "such" / "dir" / "m.safetensors")
    with pytest.raises(prefrm.FormatError):
        prefrm.Optimizer.load(model, model.to_bytes())  # a model, not a state
    other = prefrm.Model("linear", input_size=3)
    with model.optimizer() as opt:
        with pytest.raises(prefrm.MismatchError):
            prefrm.Optimizer.load(other, opt.to_bytes())
        with other.context(2) as octx:
            with pytest.raises(prefrm.MismatchError):
                opt.step(octx)
    other.close()


def test_closed_handles(model):
    ctx = model.context(4)
    opt = model.optimizer()
    ctx.close()
    ctx.close()  # idempotent
    with pytest.raises(prefrm.ClosedError):
        ctx.forward(feats(2))
    with pytest.raises(prefrm.ClosedError):
        opt.step(ctx)
    ctx2 = model.context(4)
    model.close()  # closes its children first
    assert ctx2.closed and opt.closed
    for f in (lambda: model.num_params, lambda: model.save("x"), lambda: ctx2.forward(feats(2)),
              lambda: opt.lr, lambda: model.context(2)):
        with pytest.raises(prefrm.ClosedError):
            f()
    model.close()


def test_children_keep_model_alive():
    import gc
    m = prefrm.Model("linear", input_size=4, seed=1)
    ctx = m.context(2)
    expect = ctx.forward(feats(2))
    del m
    gc.collect()
    np.testing.assert_array_equal(ctx.forward(feats(2)), expect)
    assert not ctx.model.closed
    ctx.close()


def test_unknown_options():
    with pytest.raises(TypeError, match="unknown model option"):
        prefrm.Model("linear", input_size=4, bogus=1)
    with pytest.raises(ValueError):
        prefrm.Model("transformer")
    with pytest.raises(TypeError, match="unknown optimizer option"):
        with prefrm.Model("linear", input_size=4) as m:
            m.optimizer(learning_rate=1)
