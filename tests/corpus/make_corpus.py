#!/usr/bin/env python3
"""make_corpus.py - write the corpus of malformed checkpoints replayed by test_corpus.

Each case is one kind of damage a loader must refuse (or, for the last few, a
valid file it must accept). The files are committed next to this script; run
it again (any python3, standard library only) after changing a case:

    python3 tests/corpus/make_corpus.py tests/corpus

EXPECTED lists, per file: name, the status prm_model_load must return, and a
part of the message it must give ('-' for none).
"""
import json
import os
import struct
import sys


def f32(values):
    return struct.pack("<%df" % len(values), *values)


def st_file(header, data, raw_header=None):
    """Bytes of a safetensors file: u64 header length, JSON header, data."""
    h = raw_header if raw_header is not None else json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(h)) + h + data


def entries(tensors):
    """{name: (shape, floats)} -> header entries and data, in order."""
    header, data = {}, b""
    for name, (shape, values) in tensors.items():
        b = f32(values)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data) + len(b)]}
        data += b
    return header, data


def linear(meta=None, tensors=None):
    h, d = entries(tensors or {"score.weight": ([1, 2], [0.5, -0.25])})
    h["__metadata__"] = meta if meta is not None else {"model": "linear", "d": "2"}
    return h, d


def mlp_tensors():
    return {
        "layers.0.weight": ([2, 2], [0.1, 0.2, 0.3, 0.4]),
        "layers.0.bias": ([2], [0.0, 0.1]),
        "score.weight": ([1, 2], [1.0, -1.0]),
    }


def gpt2_tensors(C=2, V=3, T=2, L=1, prefix="transformer."):
    t = {prefix + "wte.weight": ([V, C], [0.01] * V * C), prefix + "wpe.weight": ([T, C], [0.02] * T * C)}
    for l in range(L):
        b = "%sh.%d." % (prefix, l)
        for name, shape in [("ln_1.weight", [C]), ("ln_1.bias", [C]), ("attn.c_attn.weight", [C, 3 * C]),
                            ("attn.c_attn.bias", [3 * C]), ("attn.c_proj.weight", [C, C]),
                            ("attn.c_proj.bias", [C]), ("ln_2.weight", [C]), ("ln_2.bias", [C]),
                            ("mlp.c_fc.weight", [C, 4 * C]), ("mlp.c_fc.bias", [4 * C]),
                            ("mlp.c_proj.weight", [4 * C, C]), ("mlp.c_proj.bias", [C])]:
            n = shape[0] * (shape[1] if len(shape) == 2 else 1)
            t[b + name] = (shape, [1.0 if "ln" in name and "weight" in name else 0.01] * n)
    t[prefix + "ln_f.weight"] = ([C], [1.0] * C)
    t[prefix + "ln_f.bias"] = ([C], [0.0] * C)
    return t


def gpt2(meta=None, **kw):
    t = gpt2_tensors(**kw)
    t["score.weight"] = ([1, 2], [0.3, -0.3])
    h, d = entries(t)
    h["__metadata__"] = meta if meta is not None else {"model": "gpt2", "n_head": "1"}
    return h, d


def llama(meta=None, hd=2, H=1, G=1, D=2, F=3, V=3):
    p = "model.layers.0."
    t = {"model.embed_tokens.weight": ([V, D], [0.01] * V * D),
         p + "self_attn.q_proj.weight": ([H * hd, D], [0.01] * H * hd * D),
         p + "self_attn.k_proj.weight": ([G * hd, D], [0.01] * G * hd * D),
         p + "self_attn.v_proj.weight": ([G * hd, D], [0.01] * G * hd * D),
         p + "self_attn.o_proj.weight": ([D, H * hd], [0.01] * H * hd * D),
         p + "mlp.gate_proj.weight": ([F, D], [0.01] * F * D),
         p + "mlp.up_proj.weight": ([F, D], [0.01] * F * D),
         p + "mlp.down_proj.weight": ([D, F], [0.01] * F * D),
         p + "input_layernorm.weight": ([D], [1.0] * D),
         p + "post_attention_layernorm.weight": ([D], [1.0] * D),
         "model.norm.weight": ([D], [1.0] * D),
         "score.weight": ([1, D], [0.5] * D)}
    h, d = entries(t)
    h["__metadata__"] = meta if meta is not None else {"model": "llama", "n_head": str(H), "n_positions": "8"}
    return h, d


def cases():
    """(name, bytes, status, message part)."""
    out = []

    def add(name, data, status, msg):
        out.append((name, data, status, msg))

    add("empty", b"", "PRM_ERR_FORMAT", "shorter than the header length")
    add("seven_bytes", b"\x10\0\0\0\0\0\0", "PRM_ERR_FORMAT", "shorter than the header length")
    add("text_file", b"this is a plain text file, not a checkpoint\n", "PRM_ERR_FORMAT",
        "not a safetensors file")
    h, d = linear()
    full = st_file(h, d)
    add("truncated_header", full[:20], "PRM_ERR_FORMAT", "truncated")
    add("truncated_data", full[:-3], "PRM_ERR_FORMAT", "outside the data area")
    add("header_not_json", st_file(None, d, raw_header=b"[1, 2, 3]  "), "PRM_ERR_FORMAT",
        "not a safetensors file")
    add("header_trailing_bytes", st_file(None, d, raw_header=json.dumps(h).encode() + b" x"), "PRM_ERR_FORMAT",
        "trailing bytes")
    h2 = json.loads(json.dumps(h))
    h2["score.weight"]["dtype"] = "F64"
    add("dtype_f64", st_file(h2, d), "PRM_ERR_FORMAT", "dtype F64, expected F32, F16 or BF16")
    h2 = json.loads(json.dumps(h))
    h2["score.weight"]["data_offsets"] = [0, 4]
    add("offsets_span_wrong", st_file(h2, d), "PRM_ERR_FORMAT", "data_offsets span")
    h2 = json.loads(json.dumps(h))
    h2["score.weight"]["data_offsets"] = [8, 16]
    add("offsets_outside", st_file(h2, d), "PRM_ERR_FORMAT", "outside the data area")
    hm, dm = entries(mlp_tensors())
    hm["__metadata__"] = {"model": "mlp", "act": "relu"}
    hm["layers.0.bias"]["data_offsets"] = [8, 16]
    add("overlapping_tensors", st_file(hm, dm), "PRM_ERR_FORMAT", "overlap")
    raw = json.dumps(h).encode()[:-1] + b',"score.weight":{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]}}'
    add("duplicate_tensor", st_file(None, d, raw_header=raw), "PRM_ERR_FORMAT", "duplicate")
    raw = json.dumps(h).replace('"d": "2"', '"d": "2", "d": "2"').encode()
    add("duplicate_metadata_key", st_file(None, d, raw_header=raw), "PRM_ERR_FORMAT", "duplicate")
    add("nan_value", st_file(*linear(tensors={"score.weight": ([1, 2], [float("nan"), 1.0])})), "PRM_ERR_FORMAT",
        "NaN or Inf")
    add("inf_value", st_file(*linear(tensors={"score.weight": ([1, 2], [1.0, float("inf")])})), "PRM_ERR_FORMAT",
        "NaN or Inf")
    add("unknown_model_type", st_file(*linear(meta={"model": "resnet"})), "PRM_ERR_FORMAT", "unknown model type")
    t = mlp_tensors()
    del t["layers.0.bias"]
    hm, dm = entries(t)
    hm["__metadata__"] = {"model": "mlp", "act": "relu"}
    add("missing_tensor", st_file(hm, dm), "PRM_ERR_FORMAT", "missing tensor layers.0.bias")
    t = mlp_tensors()
    t["layers.0.extra"] = ([1], [0.0])
    hm, dm = entries(t)
    hm["__metadata__"] = {"model": "mlp", "act": "relu"}
    add("unexpected_tensor", st_file(hm, dm), "PRM_ERR_FORMAT", "unexpected tensor layers.0.extra")
    hm, dm = entries(mlp_tensors())
    hm["__metadata__"] = {"model": "mlp"}
    add("mlp_without_act", st_file(hm, dm), "PRM_ERR_FORMAT", "'act'")
    add("wrong_shape", st_file(*linear(meta={"model": "linear", "d": "3"})), "PRM_ERR_FORMAT", "has shape")
    add("gpt2_without_n_head", st_file(*gpt2(meta={"model": "gpt2"})), "PRM_ERR_FORMAT", "n_head")
    add("gpt2_other_eps", st_file(*gpt2(meta={"model": "gpt2", "n_head": "1", "layer_norm_epsilon": "1e-06"})),
        "PRM_ERR_UNSUPPORTED", "layer_norm_epsilon")
    add("gpt2_n_layer_disagrees", st_file(*gpt2(meta={"model": "gpt2", "n_head": "1", "n_layer": "2"})),
        "PRM_ERR_FORMAT", "disagrees")
    t = gpt2_tensors()
    t["lm_head.weight"] = ([3, 2], [0.01] * 6)
    hg, dg = entries(t)
    hg["__metadata__"] = {"format": "pt", "n_head": "1"}
    add("gpt2_language_model", st_file(hg, dg), "PRM_ERR_FORMAT", "prm_model_load_pretrained")
    add("llama_without_n_positions", st_file(*llama(meta={"model": "llama", "n_head": "1"})), "PRM_ERR_FORMAT",
        "n_positions")
    add("llama_odd_head_dim", st_file(*llama(hd=3, D=3)), "PRM_ERR_FORMAT", "even")
    add("metadata_value_not_string",
        st_file(None, d, raw_header=json.dumps(h).replace('"d": "2"', '"d": 2').encode()),
        "PRM_ERR_FORMAT", "must be strings")
    deep = (b'{"__metadata__":{"model":"linear"},"x":{"dtype":"F32","shape":[1],'
            b'"data_offsets":[0,4],"extra":' + b"[" * 80 + b"]" * 80 + b"}}")
    add("nesting_too_deep", st_file(None, f32([1.0]), raw_header=deep), "PRM_ERR_FORMAT", "nested too deeply")
    bad = json.dumps(h).encode().replace(b"score.weight", b"score.w\xffight")
    add("invalid_utf8_name", st_file(None, d, raw_header=bad), "PRM_ERR_FORMAT", "UTF-8")
    add("negative_shape", st_file(None, d, raw_header=json.dumps(h).replace("[1, 2]", "[1, -2]").encode()),
        "PRM_ERR_FORMAT", "bad safetensors header")
    add("reward_mean_without_std", st_file(*linear(meta={"model": "linear", "reward_mean": "1.5"})),
        "PRM_ERR_FORMAT", "reward normalisation needs both")
    add("reward_std_zero",
        st_file(*linear(meta={"model": "linear", "reward_mean": "1.5", "reward_std": "0.0"})),
        "PRM_ERR_FORMAT", "reward_std")
    # valid files: the loader must accept them
    add("valid_linear", full, "PRM_OK", "-")
    add("valid_gpt2_bare_names", st_file(*gpt2(prefix="")), "PRM_OK", "-")
    add("valid_llama", st_file(*llama(H=2, G=1, D=4)), "PRM_OK", "-")
    return out


def main():
    folder = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    lines = []
    for name, data, status, msg in cases():
        with open(os.path.join(folder, name + ".safetensors"), "wb") as f:
            f.write(data)
        lines.append("%s %s %s" % (name, status, msg))
    with open(os.path.join(folder, "EXPECTED"), "w") as f:
        f.write("# file status message-part ('-': none); written by make_corpus.py\n")
        f.write("\n".join(lines) + "\n")
    print("%d files" % len(lines))


if __name__ == "__main__":
    main()
