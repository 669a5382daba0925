"""The rest of the surface: views, copies, losses, groups, accumulation,
optimizer state, pretrained loading, reward normalisation."""
import numpy as np
import pytest

import prefrm


def data(n, d=4, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def test_views_are_zero_copy_and_copies_are_not():
    with prefrm.Model("mlp", input_size=4, hidden=[3], seed=2) as m:
        v = m.params_view()
        assert v.shape == (m.num_params,) and v.dtype == np.float32
        c = m.params()
        np.testing.assert_array_equal(v, c)
        new = c + 1
        m.write_params(new)
        np.testing.assert_array_equal(v, new)  # the view sees the write
        assert not np.array_equal(c, new)
        w = m.read_tensor("score.weight")
        assert w.shape == (1, 3)
        m.write_tensor("score.weight", np.zeros((1, 3), np.float32))
        assert not m.read_tensor(m.find_tensor("score.weight")).any()
        assert [t[0] for t in m.tensors()] == ["layers.0.weight", "layers.0.bias", "score.weight"]
        assert m.options()["hidden"][0] == 3 and m.options()["n_hidden"] == 1
        with m.context(4) as ctx:
            x = data(4)
            s = ctx.forward(x)
            ctx.backward(np.ones(4, np.float32))
            g = ctx.grads_view()
            np.testing.assert_array_equal(g, ctx.grads())
            assert ctx.read_grad("layers.0.bias").shape == (3,)
            ctx.write_grad("layers.0.bias", np.ones(3, np.float32))
            ctx.write_grads(np.zeros(2, np.float32), offset=1)
            assert ctx.num_grads == m.num_params and g[1] == 0
            ctx.zero_grad()
            assert not g.any()
            out = np.full(6, -1, np.float32)
            assert ctx.forward(x, out=out) is out
            np.testing.assert_array_equal(out[:4], s)
            assert out[5] == -1
            assert ctx.model_handle() == m._ptr


def test_losses_and_groups():
    rc, rr = np.array([1, 2], np.float32), np.array([0, 3], np.float32)
    loss, st, dc, dr = prefrm.loss_bt(rc, rr)
    assert st["n_compared"] == 2 and st["accuracy"] == 0.5
    ref = np.mean(np.log1p(np.exp(-(rc - rr).astype(np.float64))))
    assert abs(loss - ref) < 1e-12
    np.testing.assert_allclose(dc, -dr)
    loss_t, st_t, _, _ = prefrm.loss_bt(rc, rr, tie_model="davidson", tie_param=0.5,
                                        tie=np.array([1, 0], np.uint8), grad=False)
    assert st_t["n_tied"] == 1
    scores = np.array([3, 2, 1, 5, 4], np.float32)
    l, st, d = prefrm.loss_rank(scores, np.array([3, 2], np.int32), loss="plackett_luce")
    assert st["exact_rate"] == 1.0 and d.shape == (5,)
    with prefrm.Model("linear", input_size=4, seed=1) as m, m.context(6) as ctx, \
            m.optimizer(algorithm="sgd", lr=0.1, momentum=0.9) as opt:
        gs = np.array([3, 3], np.int32)
        st0 = ctx.evaluate_groups(gs, data(6))
        for _ in range(3):
            st = ctx.train_step_groups(opt, gs, data(6))
        assert opt.num_updates == 3 and opt.last_grad_norm > 0
        assert st["loss"] > 0 and st0["loss"] > 0


def test_evaluate_accum_matches_one_batch():
    if not hasattr(prefrm.lib(), "prm_evaluate_accum"):
        pytest.skip("library without prm_evaluate_accum")
    with prefrm.Model("linear", input_size=4, seed=1) as m, m.context(8) as ctx:
        x = data(8)
        whole = ctx.evaluate(x)
        acc = prefrm.Accumulator()
        # the same 4 pairs streamed as two batches of 2 pairs
        ctx.evaluate_accum(acc, np.concatenate([x[0:2], x[4:6]]))
        ctx.evaluate_accum(acc, np.concatenate([x[2:4], x[6:8]]))
        st = acc.stats()
        assert acc.n_units == 4 and st["n_compared"] == whole["n_compared"]
        assert abs(st["loss"] - whole["loss"]) < 1e-12
        assert abs(st["accuracy"] - whole["accuracy"]) < 1e-12
        with pytest.raises(prefrm.MismatchError):
            ctx.evaluate_groups_accum(acc, np.array([2, 2], np.int32), data(4))
        acc.reset()
        with pytest.raises(prefrm.StateError):
            acc.stats()


def test_optimizer_resume_and_lr_control(tmp_path):
    x = [data(4, seed=s) for s in range(6)]
    with prefrm.Model("linear", input_size=4, seed=5) as m, m.context(4) as ctx, \
            m.optimizer(lr=1e-2, schedule="cosine", total_steps=10, warmup_steps=2) as opt:
        for s in range(3):
            ctx.train_step(opt, x[s])
        opt.set_lr_scale(0.5)
        assert opt.lr_scale == 0.5
        opt.set_lr(2e-2)
        with pytest.raises(prefrm.InvalidError):
            opt.set_lr(-1)
        opt.save(tmp_path / "o.st")
        mbytes, obytes = m.to_bytes(), opt.to_bytes()
        assert (tmp_path / "o.st").read_bytes() == obytes
        lr_next = opt.lr
        for s in range(3, 6):
            ctx.train_step(opt, x[s])
        final = m.params()
    with prefrm.Model.from_bytes(mbytes) as m2, m2.context(4) as ctx2, \
            prefrm.Optimizer.load(m2, tmp_path / "o.st") as opt2:
        assert opt2.num_updates == 3 and opt2.lr == lr_next and opt2.lr_scale == 0.5
        for s in range(3, 6):
            ctx2.train_step(opt2, x[s])
        assert m2.params().tobytes() == final.tobytes()


def test_set_trainable_and_pretrained(tmp_path):
    with prefrm.Model("mlp", input_size=4, hidden=[6, 5], seed=9) as m:
        m.set_trainable(0)
        assert m.trainable_offset == m.num_params - 5
        with m.context(2) as ctx:
            assert ctx.num_grads == 5
        m.save(tmp_path / "m.safetensors")
        blob = m.to_bytes()
    m2, rep = prefrm.Model.load_pretrained(tmp_path / "m.safetensors", seed=1, fresh_head=True)
    with m2:
        assert rep["n_initialised"] == 1 and "initialised score.weight" in rep["text"]
        assert m2.trainable_offset == 0  # pretrained loads train everything
    m3, rep = prefrm.Model.load_pretrained(blob)
    with m3:
        assert rep["n_loaded"] == 5 and rep["n_initialised"] == 0
        assert m3.arch == "mlp" and m3.input_size == 4


def test_reward_norm():
    r = np.array([1, 2, 3, 4], np.float32)
    mom = prefrm.Moments().add(r)
    assert mom.count == 4 and mom.mean == 2.5
    with prefrm.Model("linear", input_size=2) as m:
        m.set_reward_norm(mom)
        mean, std = m.reward_norm()
        assert mean == 2.5 and abs(std - np.std(r.astype(np.float64))) < 1e-12
        out = m.normalise_rewards(r.copy())
        np.testing.assert_allclose(out, (r - 2.5) / std, rtol=1e-6)
        m.set_reward_norm(None)
        with pytest.raises(prefrm.StateError):
            m.reward_norm()


def test_token_model_forward_and_train():
    with prefrm.Model("gpt2", vocab_size=11, n_ctx=8, n_embd=8, n_layer=1, n_head=2,
                      seed=3) as m:
        assert m.arch == "gpt2" and m.max_len == 8 and m.vocab_size == 11
        rng = np.random.default_rng(1)
        wide = rng.integers(0, 11, (4, 10)).astype(np.int32)
        lengths = np.array([3, 6, 6, 2], np.int32)
        with m.context(4, max_len=6) as ctx, m.optimizer(lr=1e-2) as opt:
            assert ctx.max_len == 6
            s_contig = ctx.forward(tokens=np.ascontiguousarray(wide[:, :6]), lengths=lengths)
            s_strided = ctx.forward(tokens=wide[:, :6], lengths=lengths)  # token_stride 10
            np.testing.assert_array_equal(s_contig, s_strided)
            st = ctx.train_step(opt, tokens=wide[:, :6], lengths=lengths)
            assert opt.num_updates == 1 and st["n_compared"] == 2
            with pytest.raises(TypeError, match="int32"):
                ctx.forward(tokens=wide.astype(np.int64), lengths=lengths)
            with pytest.raises(ValueError, match="lengths"):
                ctx.forward(tokens=wide[:, :6])
            with pytest.raises(ValueError, match="4 elements"):
                ctx.forward(tokens=wide[:, :6], lengths=lengths[:3])
            bad = wide[:, :6].copy()
            bad[0, 0] = 11
            with pytest.raises(prefrm.InvalidError):
                ctx.forward(tokens=bad, lengths=lengths)
            with pytest.raises(prefrm.SizeError):
                ctx.forward(tokens=wide[:, :6], lengths=np.array([3, 7, 6, 2], np.int32))


def test_shared_prefixes():
    # rows 2 and 3 (the rejected responses) repeat their chosen row's prompt
    with prefrm.Model("llama", vocab_size=13, n_ctx=12, n_embd=16, n_layer=2, n_head=4,
                      n_kv_head=2, seed=4) as m, m.context(4) as ctx:
        rng = np.random.default_rng(2)
        tokens = rng.integers(0, 13, (4, 12)).astype(np.int32)
        lengths = np.array([9, 7, 11, 5], np.int32)
        prefix_row = np.array([0, 0, 0, 1], np.int32)
        prefix_len = np.array([0, 0, 4, 3], np.int32)
        tokens[2, :4] = tokens[0, :4]
        tokens[3, :3] = tokens[1, :3]
        plain = ctx.forward(tokens=tokens, lengths=lengths)
        assert ctx.tokens_computed == 32
        shared = ctx.forward(tokens=tokens, lengths=lengths, prefix_row=prefix_row,
                             prefix_len=prefix_len)
        assert ctx.tokens_computed == 32 - 7
        np.testing.assert_allclose(shared, plain, rtol=1e-5, atol=1e-6)
        st = ctx.evaluate(tokens=tokens, lengths=lengths, prefix_row=prefix_row,
                          prefix_len=prefix_len)
        assert st["n_compared"] == 2
        tokens[3, 0] = (tokens[3, 0] + 1) % 13  # no longer row 1's prefix: refused
        with pytest.raises(prefrm.InvalidError, match="differs"):
            ctx.forward(tokens=tokens, lengths=lengths, prefix_row=prefix_row,
                        prefix_len=prefix_len)
        with pytest.raises(ValueError, match="both"):
            ctx.forward(tokens=tokens, lengths=lengths, prefix_row=prefix_row)


def test_workers_bit_identical():
    # one context on a pool of 3 threads scores and trains bit for bit like
    # one on the calling thread
    with prefrm.Model("gpt2", vocab_size=17, n_ctx=40, n_embd=16, n_layer=2, n_head=2,
                      seed=5) as m1, prefrm.Model("gpt2", vocab_size=17, n_ctx=40, n_embd=16,
                                                  n_layer=2, n_head=2, seed=5) as m3:
        rng = np.random.default_rng(3)
        tokens = rng.integers(0, 17, (6, 40)).astype(np.int32)
        lengths = rng.integers(1, 41, 6).astype(np.int32)
        with m1.context(6) as c1, m3.context(6, workers=3) as c3, \
                m1.optimizer(lr=1e-2) as o1, m3.optimizer(lr=1e-2) as o3:
            assert c1.workers == 1 and c3.workers == 3
            np.testing.assert_array_equal(c1.forward(tokens=tokens, lengths=lengths),
                                          c3.forward(tokens=tokens, lengths=lengths))
            for _ in range(2):
                s1 = c1.train_step(o1, tokens=tokens, lengths=lengths)
                s3 = c3.train_step(o3, tokens=tokens, lengths=lengths)
                assert s1["loss"] == s3["loss"]
            np.testing.assert_array_equal(m1.params(), m3.params())
    with pytest.raises(ValueError, match="workers"):
        prefrm.Model("linear", input_size=3).context(2, workers=0)


def test_gather_tokens():
    seqs = [[1, 2, 3], [4], np.array([5, 6], dtype=np.int32)]
    out = prefrm.gather_tokens(seqs, stride=4, pad=9)
    assert out.dtype == np.int32 and out.shape == (3, 4)
    assert out.tolist() == [[1, 2, 3, 9], [4, 9, 9, 9], [5, 6, 9, 9]]
    assert prefrm.gather_tokens(seqs).shape == (3, 3)  # stride: the longest
    with pytest.raises(prefrm.PrmError):
        prefrm.gather_tokens(seqs, stride=2)  # a sequence longer than the stride
    with pytest.raises(prefrm.PrmError):
        prefrm.gather_tokens([[1], []])  # an empty sequence
