"""prefrm: Python bindings of libprefrm (reward models from pairwise
preferences), pure Python over ctypes with numpy arrays in and out.

Objects: :class:`Model`, :class:`Context`, :class:`Optimizer` (context
managers; ``close()`` frees the C handle exactly once; a Context or Optimizer
keeps its Model alive, and closing a Model first closes its children).
Every failing status raises a :class:`PrmError` subclass carrying
``.status``, ``.status_name`` (prm_status_string) and ``.message`` (the
calling thread's prm_last_errmsg). Arrays are checked (dtype -> TypeError;
shape, contiguity -> ValueError) before any C call.

The library is found at: the `path` of :func:`init`, else $PREFRM_LIBRARY,
else the system loader (``libprefrm.so.0``). It loads on first use.
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from ctypes import byref, c_char_p, c_double, c_size_t, c_uint32, c_uint64, c_void_p
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _capi
from ._capi import (Batch, CtxOptions, EvalAccum, LoadReport, LossOptions, LossStats,
                    ModelOptions, OptimizerOptions, PretrainedOptions,
                    RankOptions, RewardMoments)

__all__ = [
    "init", "lib", "version", "status_string", "last_errmsg", "PrmError",
    "ClosedError", "Model", "Context", "Optimizer", "Moments", "Accumulator", "loss_bt",
    "loss_rank", "gather_tokens",
]

_lib: Optional[ctypes.CDLL] = None
_lib_lock = threading.Lock()


def init(path: Optional[str] = None) -> ctypes.CDLL:
    """Load libprefrm (explicit `path`, else $PREFRM_LIBRARY, else the system
    loader). Only the first call loads; later calls return the same library
    and a different `path` raises RuntimeError."""
    global _lib
    with _lib_lock:
        if _lib is None:
            _lib = _capi.load(path)
            _lib._prefrm_path = _capi.find_library(path)
        elif path is not None and path != _lib._prefrm_path:
            raise RuntimeError(f"libprefrm already loaded from {_lib._prefrm_path}")
        return _lib


def lib() -> ctypes.CDLL:
    """The loaded ctypes library (loading it on first use)."""
    return _lib if _lib is not None else init()


# ----------------------------------------------------------------- errors

ARCHS = {"linear": 1, "mlp": 2, "gpt2": 3, "llama": 4}
ACTIVATIONS = {"relu": 1, "gelu_tanh": 2, "tanh": 3}
TIE_MODELS = {None: 0, "none": 0, "rao_kupper": 1, "davidson": 2}
RANK_LOSSES = {"pairwise": 1, "plackett_luce": 2}
ALGORITHMS = {"sgd": 1, "adam": 2, "adamw": 3}
SCHEDULES = {"constant": 1, "linear": 2, "cosine": 3}


class PrmError(Exception):
    """A libprefrm call returned a negative status.

    Attributes: status (int), status_name (prm_status_string), message
    (the library's detail: prm_last_errmsg of the calling thread)."""

    status = 0

    def __init__(self, status: int, status_name: str, message: str, call: str = ""):
        self.status = status
        self.status_name = status_name
        self.message = message
        self.call = call
        super().__init__(f"{call}: {status_name}: {message}" if call else
                         f"{status_name}: {message}")


def _errcls(name: str, status: int, doc: str) -> type:
    return type(name, (PrmError,), {"status": status, "__doc__": doc})


NullError = _errcls("NullError", -1, "PRM_ERR_NULL")
InvalidError = _errcls("InvalidError", -2, "PRM_ERR_INVALID")
SizeError = _errcls("SizeError", -3, "PRM_ERR_SIZE")
NonfiniteError = _errcls("NonfiniteError", -4, "PRM_ERR_NONFINITE")
VersionError = _errcls("VersionError", -5, "PRM_ERR_VERSION")
NoMemError = _errcls("NoMemError", -6, "PRM_ERR_NOMEM")
StateError = _errcls("StateError", -7, "PRM_ERR_STATE")
MismatchError = _errcls("MismatchError", -8, "PRM_ERR_MISMATCH")
PrmIOError = _errcls("PrmIOError", -9, "PRM_ERR_IO")
FormatError = _errcls("FormatError", -10, "PRM_ERR_FORMAT")
NonfiniteGradError = _errcls("NonfiniteGradError", -11, "PRM_ERR_NONFINITE_GRAD")
UnsupportedError = _errcls("UnsupportedError", -12, "PRM_ERR_UNSUPPORTED")
ERRORS = {c.status: c for c in (NullError, InvalidError, SizeError, NonfiniteError,
                                VersionError, NoMemError, StateError, MismatchError,
                                PrmIOError, FormatError, NonfiniteGradError,
                                UnsupportedError)}
__all__ += [c.__name__ for c in ERRORS.values()]


class ClosedError(ValueError):
    """Use of a Model, Context or Optimizer after close()."""


def version() -> str:
    """prm_version_string of the loaded library, e.g. '0.5.0'."""
    return lib().prm_version_string().decode()


def status_string(status: int) -> str:
    """prm_status_string(status)."""
    return lib().prm_status_string(status).decode()


def last_errmsg() -> str:
    """prm_last_errmsg(): the calling thread's last failure detail."""
    return lib().prm_last_errmsg().decode(errors="replace")


def _check(rc: int, call: str) -> None:
    if rc < 0:
        raise ERRORS.get(rc, PrmError)(rc, status_string(rc), last_errmsg(), call)


def _struct_dict(s: ctypes.Structure) -> Dict[str, Any]:
    out = {}
    for name, _ in s._fields_:
        if name == "version":
            continue
        v = getattr(s, name)
        out[name] = list(v) if isinstance(v, ctypes.Array) else v
    return out


# ----------------------------------------------------------------- arrays

def _arr(a: Any, dtype: Any, name: str, ndim: int = 1,
         length: Optional[int] = None, writable: bool = False) -> np.ndarray:
    """Check (never copy) a contiguous array of `dtype` and `ndim`."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray of {np.dtype(dtype)}, "
                        f"got {type(a).__name__}")
    if a.dtype != np.dtype(dtype):
        raise TypeError(f"{name}: dtype must be {np.dtype(dtype)}, got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim}-D, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: array must be C-contiguous")
    if length is not None and a.shape[0] != length:
        raise ValueError(f"{name}: expected {length} elements, got {a.shape[0]}")
    if writable and not a.flags.writeable:
        raise ValueError(f"{name}: array is read-only")
    return a


def _ptr(a: Optional[np.ndarray]) -> Optional[int]:
    return None if a is None else a.ctypes.data


def _opt_arr(a: Any, dtype: Any, name: str, length: int) -> Optional[np.ndarray]:
    return None if a is None else _arr(a, dtype, name, 1, length)


class _BatchArgs:
    """A prm_batch over borrowed numpy arrays (kept referenced here)."""

    def __init__(self, features: Optional[np.ndarray], tokens: Optional[np.ndarray],
                 lengths: Optional[np.ndarray], prefix_row: Optional[np.ndarray] = None,
                 prefix_len: Optional[np.ndarray] = None):
        self.b = _capi.new_struct(lib(), Batch)
        self.keep = (features, tokens, lengths, prefix_row, prefix_len)
        if (prefix_row is None) != (prefix_len is None):
            raise ValueError("give both prefix_row and prefix_len, or neither")
        if prefix_row is not None and tokens is None:
            raise ValueError("shared prefixes (prefix_row, prefix_len) need a token batch")
        if features is not None:
            if tokens is not None or lengths is not None:
                raise ValueError("give features or tokens/lengths, not both")
            if not isinstance(features, np.ndarray):
                raise TypeError("features: expected a numpy.ndarray of float32")
            if features.dtype != np.float32:
                raise TypeError(f"features: dtype must be float32, got {features.dtype}")
            if features.ndim != 2:
                raise ValueError(f"features: expected 2-D (rows, n_features), got shape {features.shape}")
            n, d = features.shape
            s0, s1 = features.strides
            # rows may be strided (prm_batch.row_stride); elements may not
            if n and d and (s1 != 4 or s0 % 4 or s0 < 4 * d) and not features.flags.c_contiguous:
                raise ValueError("features: rows must be contiguous float32 "
                                 "(a positive row stride is allowed)")
            self.b.n = n
            self.b.features = features.ctypes.data
            self.b.n_features = d
            self.b.row_stride = d if features.flags.c_contiguous else s0 // 4
        elif tokens is not None:
            if lengths is None:
                raise ValueError("tokens need lengths")
            if not isinstance(tokens, np.ndarray):
                raise TypeError("tokens: expected a numpy.ndarray of int32")
            if tokens.dtype != np.int32:
                raise TypeError(f"tokens: dtype must be int32, got {tokens.dtype}")
            if tokens.ndim != 2:
                raise ValueError(f"tokens: expected 2-D (rows, max_len), got shape {tokens.shape}")
            n, t = tokens.shape
            s0, s1 = tokens.strides
            if not tokens.flags.c_contiguous and (s1 != 4 or s0 % 4 or s0 < 4 * t):
                raise ValueError("tokens: rows must be contiguous int32")
            _arr(lengths, np.int32, "lengths", 1, n)
            self.b.n = n
            self.b.tokens = tokens.ctypes.data
            self.b.token_stride = t if tokens.flags.c_contiguous else s0 // 4
            self.b.lengths = lengths.ctypes.data
            if prefix_row is not None:
                # prm_batch version 2: row i repeats the first prefix_len[i]
                # tokens of the earlier row prefix_row[i] (computed once)
                _arr(prefix_row, np.int32, "prefix_row", 1, n)
                _arr(prefix_len, np.int32, "prefix_len", 1, n)
                self.b.prefix_row = prefix_row.ctypes.data
                self.b.prefix_len = prefix_len.ctypes.data
        else:
            raise ValueError("a batch needs features or tokens and lengths")


def _loss_opts(n_pairs: int, margin=None, label=None, weight=None,
               center_coef: float = 0.0, tie_model: Optional[str] = None,
               tie_param: float = 0.0, tie=None) -> Tuple[Optional[LossOptions], tuple]:
    if (margin is None and label is None and weight is None and not center_coef
            and tie_model in (None, "none") and not tie_param and tie is None):
        return None, ()
    if tie_model not in TIE_MODELS:
        raise ValueError(f"tie_model must be one of {list(TIE_MODELS)}")
    keep = (_opt_arr(margin, np.float32, "margin", n_pairs),
            _opt_arr(label, np.float32, "label", n_pairs),
            _opt_arr(weight, np.float32, "weight", n_pairs),
            _opt_arr(tie, np.uint8, "tie", n_pairs))
    o = _capi.new_struct(lib(), LossOptions)
    o.margin, o.label, o.weight, o.tie = (_ptr(a) for a in keep)
    o.center_coef = float(center_coef)
    o.tie_model = TIE_MODELS[tie_model]
    o.tie_param = float(tie_param)
    return o, keep


def _rank_opts(n_groups: int, loss: str = "pairwise",
               weight=None) -> Tuple[RankOptions, tuple]:
    if loss not in RANK_LOSSES:
        raise ValueError(f"loss must be one of {list(RANK_LOSSES)}")
    w = _opt_arr(weight, np.float32, "weight", n_groups)
    o = _capi.new_struct(lib(), RankOptions)
    o.loss = RANK_LOSSES[loss]
    o.weight = _ptr(w)
    return o, (w,)


def _new_stats() -> LossStats:
    return _capi.new_struct(lib(), LossStats)


# ----------------------------------------------------------------- pure losses

def loss_bt(r_chosen: np.ndarray, r_rejected: np.ndarray, *, grad: bool = True,
            **loss_options: Any) -> Tuple[float, Dict[str, Any], Optional[np.ndarray],
                                          Optional[np.ndarray]]:
    """prm_loss_bt over float32 score arrays.

    Keyword options: margin, label, weight (float32, one per pair),
    center_coef, tie_model ('rao_kupper' | 'davidson'), tie_param, tie
    (uint8 flags). Returns (loss, stats dict, d_chosen, d_rejected); the
    gradients are None when grad is False."""
    rc_ = _arr(r_chosen, np.float32, "r_chosen")
    rr_ = _arr(r_rejected, np.float32, "r_rejected", 1, rc_.shape[0])
    n = rc_.shape[0]
    opts, keep = _loss_opts(n, **loss_options)
    loss = c_double()
    stats = _new_stats()
    dc = np.empty(n, np.float32) if grad else None
    dr = np.empty(n, np.float32) if grad else None
    _check(lib().prm_loss_bt(_ptr(rc_), _ptr(rr_), n, byref(opts) if opts else None,
                             byref(loss), byref(stats), _ptr(dc), _ptr(dr)), "prm_loss_bt")
    return loss.value, _struct_dict(stats), dc, dr


def loss_rank(scores: np.ndarray, group_sizes: np.ndarray, *, loss: str = "pairwise",
              weight: Optional[np.ndarray] = None, grad: bool = True
              ) -> Tuple[float, Dict[str, Any], Optional[np.ndarray]]:
    """prm_loss_rank: K-wise ranking loss of groups laid back to back, best
    first. group_sizes: int32. Returns (loss, stats dict, d_scores)."""
    s = _arr(scores, np.float32, "scores")
    g = _arr(group_sizes, np.int32, "group_sizes")
    opts, keep = _rank_opts(g.shape[0], loss, weight)
    out = c_double()
    stats = _new_stats()
    d = np.empty(s.shape[0], np.float32) if grad else None
    _check(lib().prm_loss_rank(_ptr(s), s.shape[0], _ptr(g), g.shape[0], byref(opts),
                               byref(out), byref(stats), _ptr(d)), "prm_loss_rank")
    return out.value, _struct_dict(stats), d


def gather_tokens(seqs: Sequence[Any], stride: Optional[int] = None,
                  pad: int = 0) -> np.ndarray:
    """Pack token sequences (each a 1-D int32 array or list of ids) into the
    (n, stride) right-padded int32 array a token batch reads, with the
    library's prm_tokens_gather. `stride` defaults to the longest sequence.
    Returns the array; pass it with the lengths to Context.forward."""
    arrs = [np.ascontiguousarray(s_, dtype=np.int32) for s_ in seqs]
    if not arrs:
        raise ValueError("gather_tokens: no sequences")
    lengths = np.array([a.shape[0] for a in arrs], dtype=np.int32)
    if any(a.ndim != 1 for a in arrs):
        raise ValueError("gather_tokens: every sequence must be 1-D")
    width = int(lengths.max()) if stride is None else int(stride)
    out = np.empty((len(arrs), width), dtype=np.int32)
    ptrs = (ctypes.POINTER(ctypes.c_int32) * len(arrs))(
        *[a.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)) for a in arrs])
    _check(lib().prm_tokens_gather(out.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), width,
                                   len(arrs), ptrs,
                                   lengths.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), pad),
           "prm_tokens_gather")
    return out


class Moments:
    """prm_reward_moments: streaming mean / variance of rewards."""

    def __init__(self) -> None:
        self._m = _capi.new_struct(lib(), RewardMoments)

    def add(self, rewards: np.ndarray) -> "Moments":
        r = _arr(rewards, np.float32, "rewards")
        _check(lib().prm_reward_moments_add(byref(self._m), _ptr(r), r.shape[0]),
               "prm_reward_moments_add")
        return self

    @property
    def count(self) -> int:
        return self._m.count

    @property
    def mean(self) -> float:
        return self._m.mean

    @property
    def m2(self) -> float:
        return self._m.m2


class Accumulator:
    """prm_eval_accum: statistics of an evaluation set streamed batch by
    batch (Context.evaluate_accum / evaluate_groups_accum), as if it were
    one batch (:meth:`stats`). Needs a library with the prm_eval_accum_*
    functions (0.4 onwards)."""

    def __init__(self) -> None:
        self._a = _capi.new_struct(lib(), EvalAccum)

    def reset(self) -> None:
        """prm_eval_accum_init: start over."""
        _check(lib().prm_eval_accum_init(byref(self._a), _capi.PRM_EVAL_ACCUM_VERSION),
               "prm_eval_accum_init")

    @property
    def n_units(self) -> int:
        """Pairs or groups accumulated."""
        return self._a.n_units

    def fields(self) -> Dict[str, Any]:
        """The raw accumulator fields."""
        return _struct_dict(self._a)

    def stats(self) -> Dict[str, Any]:
        """prm_eval_accum_stats: the statistics of everything accumulated."""
        st = _new_stats()
        _check(lib().prm_eval_accum_stats(byref(self._a), byref(st)), "prm_eval_accum_stats")
        return _struct_dict(st)


# ----------------------------------------------------------------- handles

class _Handle:
    """An owned C handle: freed exactly once by close(), __exit__ or __del__."""

    _free_name = ""

    def __init__(self, ptr: int) -> None:
        self._ptr: Optional[int] = ptr
        self._lib = lib()  # keep the library alive until __del__

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def _h(self) -> int:
        if self._ptr is None:
            raise ClosedError(f"{type(self).__name__} is closed")
        return self._ptr

    def close(self) -> None:
        """Free the C object. Idempotent; later use raises ClosedError."""
        p, self._ptr = self._ptr, None
        if p is not None:
            getattr(self._lib, self._free_name)(p)

    def __enter__(self):
        self._h()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class Model(_Handle):
    """prm_model: architecture + all fp32 parameters.

    ``Model(arch="mlp", input_size=16, hidden=[32], seed=1)`` calls
    prm_model_new; keyword arguments are prm_model_options fields (arch and
    activation also by name: 'linear', 'mlp', 'gpt2', 'llama'; 'relu',
    'gelu_tanh', 'tanh'; hidden as a list sets n_hidden). Use
    :meth:`load`, :meth:`from_bytes`, :meth:`load_pretrained` for the
    others. Closing a model first closes its open contexts and optimizers.
    """

    _free_name = "prm_model_free"

    def __init__(self, arch: Union[str, int] = "linear", **options: Any) -> None:
        o = _model_options(arch, **options)
        out = c_void_p()
        _check(lib().prm_model_new(byref(out), byref(o)), "prm_model_new")
        self._adopt(out.value)

    def _adopt(self, ptr: int) -> None:
        _Handle.__init__(self, ptr)
        self._children: "weakref.WeakSet[_Handle]" = weakref.WeakSet()

    @classmethod
    def _wrap(cls, ptr: int) -> "Model":
        m = cls.__new__(cls)
        m._adopt(ptr)
        return m

    @classmethod
    def load(cls, path: str) -> "Model":
        """prm_model_load from a safetensors file."""
        out = c_void_p()
        _check(lib().prm_model_load(byref(out), str(path).encode()), "prm_model_load")
        return cls._wrap(out.value)

    @classmethod
    def from_bytes(cls, data: bytes) -> "Model":
        """prm_model_load_buffer."""
        data = bytes(data)
        out = c_void_p()
        _check(lib().prm_model_load_buffer(byref(out), data, len(data)),
               "prm_model_load_buffer")
        return cls._wrap(out.value)

    @classmethod
    def load_pretrained(cls, source: Union[str, bytes], *, config: Optional[Dict[str, Any]] = None,
                        seed: int = 0, fresh_head: bool = False,
                        ignore_unknown: bool = False) -> Tuple["Model", Dict[str, Any]]:
        """prm_model_load_pretrained (a path) or ..._buffer (bytes).
        config: model options as a dict (with 'arch'), for files without
        them. Returns (model, report dict with n_loaded, n_initialised,
        n_ignored and text)."""
        o = _capi.new_struct(lib(), PretrainedOptions)
        cfg = None
        if config is not None:
            cfg = _model_options(**config)
            o.config = ctypes.pointer(cfg)
        o.seed, o.fresh_head, o.ignore_unknown = seed, int(fresh_head), int(ignore_unknown)
        out = c_void_p()

        def call(report: LoadReport) -> int:
            if isinstance(source, (bytes, bytearray, memoryview)):
                data = bytes(source)
                return lib().prm_model_load_pretrained_buffer(byref(out), data, len(data),
                                                              byref(o), byref(report))
            return lib().prm_model_load_pretrained(byref(out), str(source).encode(),
                                                   byref(o), byref(report))

        size = 1 << 16
        while True:
            text = ctypes.create_string_buffer(size)
            rep = _capi.new_struct_plain(LoadReport, _capi.PRM_LOAD_REPORT_VERSION)
            rep.text, rep.text_size = ctypes.cast(text, c_void_p).value, size
            _check(call(rep), "prm_model_load_pretrained")
            if rep.text_needed <= size:
                break
            lib().prm_model_free(out.value)  # text was cut: load again, larger
            size = rep.text_needed
        m = cls._wrap(out.value)
        report = {"n_loaded": rep.n_loaded, "n_initialised": rep.n_initialised,
                  "n_ignored": rep.n_ignored, "text": text.value.decode()}
        return m, report

    # ---- children
    def context(self, max_rows: int, *, inference: bool = False, max_len: int = 0,
                workers: int = 1) -> "Context":
        """A new :class:`Context` (prm_ctx_new) for up to max_rows rows;
        workers > 1 runs it on a thread pool of its own."""
        return Context(self, max_rows, inference=inference, max_len=max_len, workers=workers)

    def optimizer(self, **options: Any) -> "Optimizer":
        """A new :class:`Optimizer` (prm_optimizer_new) for this model."""
        return Optimizer(self, **options)

    def close(self) -> None:
        """Close every open context and optimizer of this model, then free it."""
        if self._ptr is not None:
            for c in list(self._children):
                c.close()
        super().close()

    # ---- properties
    @property
    def arch(self) -> str:
        a = lib().prm_model_arch(self._h())
        return {v: k for k, v in ARCHS.items()}.get(a, str(a))

    @property
    def input_size(self) -> int:
        return lib().prm_model_input_size(self._h())

    @property
    def num_params(self) -> int:
        return lib().prm_model_num_params(self._h())

    @property
    def max_len(self) -> int:
        return lib().prm_model_max_len(self._h())

    @property
    def vocab_size(self) -> int:
        return lib().prm_model_vocab_size(self._h())

    @property
    def trainable_offset(self) -> int:
        return lib().prm_model_trainable_offset(self._h())

    @property
    def errmsg(self) -> str:
        """prm_model_errmsg: the last failure involving this model."""
        return lib().prm_model_errmsg(self._h()).decode(errors="replace")

    def options(self) -> Dict[str, Any]:
        """prm_model_get_options as a dict."""
        o = _capi.new_struct(lib(), ModelOptions)
        _check(lib().prm_model_get_options(self._h(), byref(o)), "prm_model_get_options")
        return _struct_dict(o)

    # ---- tensors and parameters
    def tensors(self) -> List[Tuple[str, int, Tuple[int, ...]]]:
        """[(name, offset, shape)] of every tensor, in arena order."""
        h, out = self._h(), []
        for i in range(lib().prm_model_num_tensors(h)):
            name, off, nd, shape = c_char_p(), c_uint64(), c_uint32(), (c_uint64 * 2)()
            _check(lib().prm_model_tensor_info(h, i, byref(name), byref(off), byref(nd), shape),
                   "prm_model_tensor_info")
            out.append((name.value.decode(), off.value, tuple(shape[: nd.value])))
        return out

    def tensor_info(self, index: int) -> Tuple[str, int, Tuple[int, ...]]:
        """prm_model_tensor_info(index): (name, offset, shape)."""
        name, off, nd, shape = c_char_p(), c_uint64(), c_uint32(), (c_uint64 * 2)()
        _check(lib().prm_model_tensor_info(self._h(), index, byref(name), byref(off),
                                           byref(nd), shape), "prm_model_tensor_info")
        return name.value.decode(), off.value, tuple(shape[: nd.value])

    def find_tensor(self, name: str) -> int:
        """prm_model_find_tensor: index of a tensor by its PyTorch name."""
        i = c_uint32()
        _check(lib().prm_model_find_tensor(self._h(), name.encode(), byref(i)),
               "prm_model_find_tensor")
        return i.value

    def _index(self, t: Union[int, str]) -> int:
        return self.find_tensor(t) if isinstance(t, str) else int(t)

    def read_tensor(self, tensor: Union[int, str]) -> np.ndarray:
        """A copy of one tensor (prm_model_read_tensor), in its shape."""
        i = self._index(tensor)
        shape = self.tensor_info(i)[2]
        out = np.empty(shape, np.float32)
        _check(lib().prm_model_read_tensor(self._h(), i, _ptr(out), out.size),
               "prm_model_read_tensor")
        return out

    def write_tensor(self, tensor: Union[int, str], values: np.ndarray) -> None:
        """prm_model_write_tensor: all or nothing; NaN/Inf refused."""
        i = self._index(tensor)
        v = _arr(values, np.float32, "values", np.ndim(values))
        _check(lib().prm_model_write_tensor(self._h(), i, _ptr(v), v.size),
               "prm_model_write_tensor")

    def params(self, offset: int = 0, n: Optional[int] = None) -> np.ndarray:
        """A copy of parameters [offset, offset + n) (prm_model_read_params)."""
        if n is None:
            n = max(self.num_params - offset, 0)
        out = np.empty(n, np.float32)
        _check(lib().prm_model_read_params(self._h(), offset, _ptr(out), n),
               "prm_model_read_params")
        return out

    def write_params(self, values: np.ndarray, offset: int = 0) -> None:
        """prm_model_write_params: all or nothing; NaN/Inf refused."""
        v = _arr(values, np.float32, "values")
        _check(lib().prm_model_write_params(self._h(), offset, _ptr(v), v.size),
               "prm_model_write_params")

    def params_view(self) -> np.ndarray:
        """BORROWED zero-copy view of the parameter arena (prm_model_params).
        Valid only while this model is open: using it after close() reads
        freed memory. Writable (no NaN/Inf checks); prefer write_params."""
        n = c_uint64()
        p = lib().prm_model_params(self._h(), byref(n))
        if not p:
            _check(-1, "prm_model_params")
        return np.ctypeslib.as_array(p, shape=(n.value,))

    def set_trainable(self, n_blocks: int) -> None:
        """prm_model_set_trainable (-1: all, 0: head only, k: last k blocks).
        Contexts and optimizers created before must be recreated."""
        _check(lib().prm_model_set_trainable(self._h(), n_blocks), "prm_model_set_trainable")

    # ---- reward normalisation
    def set_reward_norm(self, moments: Optional[Moments]) -> None:
        """prm_model_set_reward_norm (None removes the statistics)."""
        _check(lib().prm_model_set_reward_norm(self._h(), byref(moments._m) if moments else None),
               "prm_model_set_reward_norm")

    def reward_norm(self) -> Tuple[float, float]:
        """(mean, std) of prm_model_reward_norm."""
        m, s = c_double(), c_double()
        _check(lib().prm_model_reward_norm(self._h(), byref(m), byref(s)),
               "prm_model_reward_norm")
        return m.value, s.value

    def normalise_rewards(self, rewards: np.ndarray) -> np.ndarray:
        """prm_model_normalise_rewards, in place on a float32 array (returned)."""
        r = _arr(rewards, np.float32, "rewards", writable=True)
        _check(lib().prm_model_normalise_rewards(self._h(), _ptr(r), r.shape[0]),
               "prm_model_normalise_rewards")
        return r

    # ---- checkpoints
    def save(self, path: str) -> None:
        """prm_model_save (atomic safetensors file)."""
        _check(lib().prm_model_save(self._h(), str(path).encode()), "prm_model_save")

    def to_bytes(self) -> bytes:
        """prm_model_save_buffer: the bytes prm_model_save writes."""
        h, size = self._h(), c_size_t()
        _check(lib().prm_model_save_buffer(h, None, 0, byref(size)), "prm_model_save_buffer")
        buf = ctypes.create_string_buffer(size.value)
        _check(lib().prm_model_save_buffer(h, buf, size.value, byref(size)),
               "prm_model_save_buffer")
        return buf.raw[: size.value]


def _model_options(arch: Union[str, int] = "linear", **kw: Any) -> ModelOptions:
    o = _capi.new_struct(lib(), ModelOptions)
    if isinstance(arch, str):
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {list(ARCHS)}")
        arch = ARCHS[arch]
    o.arch = arch
    for k, v in kw.items():
        if k == "hidden":
            v = list(v)
            if len(v) > _capi.PRM_MAX_HIDDEN:
                raise ValueError(f"at most {_capi.PRM_MAX_HIDDEN} hidden layers")
            o.n_hidden = len(v)
            for i, w in enumerate(v):
                o.hidden[i] = w
        elif k == "activation" and isinstance(v, str):
            if v not in ACTIVATIONS:
                raise ValueError(f"activation must be one of {list(ACTIVATIONS)}")
            o.activation = ACTIVATIONS[v]
        elif k in dict(ModelOptions._fields_) and k != "version":
            setattr(o, k, v)
        else:
            raise TypeError(f"unknown model option {k!r}")
    return o


class Context(_Handle):
    """prm_ctx: what forward/backward mutate. One thread at a time per
    context; many contexts may share a model. Holds a reference to its
    Model (which stays alive while the context does)."""

    _free_name = "prm_ctx_free"

    def __init__(self, model: Model, max_rows: int, *, inference: bool = False,
                 max_len: int = 0, workers: int = 1) -> None:
        """workers > 1: the context runs each call on a prm_pool of that
        many threads of its own (results bit-identical to workers=1)."""
        if not isinstance(model, Model):
            raise TypeError("model must be a prefrm.Model")
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError("workers must be an int >= 1")
        o = _capi.new_struct(lib(), CtxOptions)
        o.inference, o.max_rows, o.max_len = int(bool(inference)), max_rows, max_len
        self._pool: Optional[int] = None
        if workers > 1:
            pool = c_void_p()
            _check(lib().prm_pool_new(byref(pool), workers), "prm_pool_new")
            self._pool = pool.value
            o.n_workers = workers
            o.parallel_for = ctypes.cast(lib().prm_pool_parallel_for, c_void_p).value
            o.parallel_arg = self._pool
        out = c_void_p()
        try:
            _check(lib().prm_ctx_new(byref(out), model._h(), byref(o)), "prm_ctx_new")
        except BaseException:
            self._free_pool()
            raise
        super().__init__(out.value)
        self.model = model
        model._children.add(self)

    def _free_pool(self) -> None:
        p, self._pool = getattr(self, "_pool", None), None
        if p is not None:
            lib().prm_pool_free(p)

    def close(self) -> None:
        """Free the context, then its thread pool (workers > 1)."""
        super().close()
        self._free_pool()

    @property
    def workers(self) -> int:
        """Threads each call runs on (prm_pool_size; 1 without a pool)."""
        return lib().prm_pool_size(self._pool) if self._pool is not None else 1

    @property
    def max_rows(self) -> int:
        return lib().prm_ctx_max_rows(self._h())

    @property
    def max_len(self) -> int:
        return lib().prm_ctx_max_len(self._h())

    @property
    def inference(self) -> bool:
        return bool(lib().prm_ctx_is_inference(self._h()))

    @property
    def num_grads(self) -> int:
        return lib().prm_ctx_num_grads(self._h())

    @property
    def tokens_computed(self) -> int:
        """prm_ctx_tokens_computed: tokens the last forward ran (each
        shared prefix once)."""
        return lib().prm_ctx_tokens_computed(self._h())

    @property
    def errmsg(self) -> str:
        """prm_ctx_errmsg: the last failure involving this context."""
        return lib().prm_ctx_errmsg(self._h()).decode(errors="replace")

    def model_handle(self) -> Optional[int]:
        """prm_ctx_model: the raw pointer of the model (for checks)."""
        return lib().prm_ctx_model(self._h())

    def forward(self, features: Optional[np.ndarray] = None, *,
                tokens: Optional[np.ndarray] = None, lengths: Optional[np.ndarray] = None,
                prefix_row: Optional[np.ndarray] = None,
                prefix_len: Optional[np.ndarray] = None,
                out: Optional[np.ndarray] = None) -> np.ndarray:
        """prm_ctx_forward. features: float32 (rows, input_size); or tokens
        int32 (rows, stride) with lengths int32 (rows,). Scores go into `out`
        (float32, >= rows, contiguous) or a new array; returned."""
        h = self._h()
        b = _BatchArgs(features, tokens, lengths, prefix_row, prefix_len)
        n = b.b.n
        if out is None:
            out = np.empty(n, np.float32)
        else:
            _arr(out, np.float32, "out", writable=True)
            if out.shape[0] < n:
                raise ValueError(f"out: needs at least {n} elements, has {out.shape[0]}")
        _check(lib().prm_ctx_forward(h, byref(b.b), _ptr(out), out.shape[0]), "prm_ctx_forward")
        return out

    def backward(self, dscores: np.ndarray) -> None:
        """prm_ctx_backward: add d(loss)/d(scores) of the last forward."""
        d = _arr(dscores, np.float32, "dscores")
        _check(lib().prm_ctx_backward(self._h(), _ptr(d), d.shape[0]), "prm_ctx_backward")

    def zero_grad(self) -> None:
        """prm_ctx_zero_grad."""
        _check(lib().prm_ctx_zero_grad(self._h()), "prm_ctx_zero_grad")

    def grads_view(self) -> np.ndarray:
        """BORROWED zero-copy view of the gradient accumulator
        (prm_ctx_grads). Valid only while this context is open."""
        n = c_uint64()
        p = lib().prm_ctx_grads(self._h(), byref(n))
        if not p:
            _check(-7, "prm_ctx_grads")
        return np.ctypeslib.as_array(p, shape=(n.value,))

    def grads(self, offset: int = 0, n: Optional[int] = None) -> np.ndarray:
        """A copy of gradients [offset, offset + n) (prm_ctx_read_grads)."""
        if n is None:
            n = max(self.num_grads - offset, 0)
        out = np.empty(n, np.float32)
        _check(lib().prm_ctx_read_grads(self._h(), offset, _ptr(out), n), "prm_ctx_read_grads")
        return out

    def write_grads(self, values: np.ndarray, offset: int = 0) -> None:
        """prm_ctx_write_grads."""
        v = _arr(values, np.float32, "values")
        _check(lib().prm_ctx_write_grads(self._h(), offset, _ptr(v), v.size),
               "prm_ctx_write_grads")

    def read_grad(self, tensor: Union[int, str]) -> np.ndarray:
        """A copy of one tensor's gradient (prm_ctx_read_grad)."""
        i = self.model._index(tensor)
        out = np.empty(self.model.tensor_info(i)[2], np.float32)
        _check(lib().prm_ctx_read_grad(self._h(), i, _ptr(out), out.size), "prm_ctx_read_grad")
        return out

    def write_grad(self, tensor: Union[int, str], values: np.ndarray) -> None:
        """prm_ctx_write_grad."""
        i = self.model._index(tensor)
        v = _arr(values, np.float32, "values", np.ndim(values))
        _check(lib().prm_ctx_write_grad(self._h(), i, _ptr(v), v.size), "prm_ctx_write_grad")

    # ---- one-call training and evaluation
    def train_step(self, opt: "Optimizer", features: Optional[np.ndarray] = None, *,
                   tokens: Optional[np.ndarray] = None, lengths: Optional[np.ndarray] = None,
                   prefix_row: Optional[np.ndarray] = None,
                   prefix_len: Optional[np.ndarray] = None,
                   **loss_options: Any) -> Dict[str, Any]:
        """prm_train_step on a pair batch (2P rows: P chosen then P
        rejected). loss_options as for :func:`loss_bt`. Returns the stats."""
        h, oh = self._h(), opt._h()
        b = _BatchArgs(features, tokens, lengths, prefix_row, prefix_len)
        lo, keep = _loss_opts(b.b.n // 2, **loss_options)
        st = _new_stats()
        _check(lib().prm_train_step(h, oh, byref(b.b), byref(lo) if lo else None, byref(st)),
               "prm_train_step")
        return _struct_dict(st)

    def evaluate(self, features: Optional[np.ndarray] = None, *,
                 tokens: Optional[np.ndarray] = None, lengths: Optional[np.ndarray] = None,
                 prefix_row: Optional[np.ndarray] = None,
                 prefix_len: Optional[np.ndarray] = None,
                 **loss_options: Any) -> Dict[str, Any]:
        """prm_evaluate on a pair batch; returns the stats."""
        h = self._h()
        b = _BatchArgs(features, tokens, lengths, prefix_row, prefix_len)
        lo, keep = _loss_opts(b.b.n // 2, **loss_options)
        st = _new_stats()
        _check(lib().prm_evaluate(h, byref(b.b), byref(lo) if lo else None, byref(st)),
               "prm_evaluate")
        return _struct_dict(st)

    def evaluate_accum(self, acc: Accumulator, features: Optional[np.ndarray] = None, *,
                       tokens: Optional[np.ndarray] = None,
                       lengths: Optional[np.ndarray] = None,
                       prefix_row: Optional[np.ndarray] = None,
                       prefix_len: Optional[np.ndarray] = None, **loss_options: Any) -> None:
        """prm_evaluate_accum: evaluate a pair batch into `acc`."""
        h = self._h()
        if not isinstance(acc, Accumulator):
            raise TypeError("acc must be a prefrm.Accumulator")
        b = _BatchArgs(features, tokens, lengths, prefix_row, prefix_len)
        lo, keep = _loss_opts(b.b.n // 2, **loss_options)
        _check(lib().prm_evaluate_accum(h, byref(b.b), byref(lo) if lo else None,
                                        byref(acc._a)), "prm_evaluate_accum")

    def evaluate_groups_accum(self, acc: Accumulator, group_sizes: np.ndarray,
                              features: Optional[np.ndarray] = None, *,
                              tokens: Optional[np.ndarray] = None,
                              lengths: Optional[np.ndarray] = None,
                              prefix_row: Optional[np.ndarray] = None,
                              prefix_len: Optional[np.ndarray] = None, loss: str = "pairwise",
                              weight: Optional[np.ndarray] = None) -> None:
        """prm_evaluate_groups_accum: evaluate a group batch into `acc`."""
        h = self._h()
        if not isinstance(acc, Accumulator):
            raise TypeError("acc must be a prefrm.Accumulator")
        g = _arr(group_sizes, np.int32, "group_sizes")
        b = _BatchArgs(features, tokens, lengths, prefix_row, prefix_len)
        ro, keep = _rank_opts(g.shape[0], loss, weight)
        _check(lib().prm_evaluate_groups_accum(h, byref(b.b), _ptr(g), g.shape[0], byref(ro),
                                               byref(acc._a)), "prm_evaluate_groups_accum")

    def train_step_groups(self, opt: "Optimizer", group_sizes: np.ndarray,
                          features: Optional[np.ndarray] = None, *,
                          tokens: Optional[np.ndarray] = None,
                          lengths: Optional[np.ndarray] = None,
                          prefix_row: Optional[np.ndarray] = None,
                          prefix_len: Optional[np.ndarray] = None, loss: str = "pairwise",
                          weight: Optional[np.ndarray] = None) -> Dict[str, Any]:
        """prm_train_step_groups: groups back to back, best first;
        group_sizes int32. Returns the stats."""
        h, oh = self._h(), opt._h()
        g = _arr(group_sizes, np.int32, "group_sizes")
        b = _BatchArgs(features, tokens, lengths, prefix_row, prefix_len)
        ro, keep = _rank_opts(g.shape[0], loss, weight)
        st = _new_stats()
        _check(lib().prm_train_step_groups(h, oh, byref(b.b), _ptr(g), g.shape[0], byref(ro),
                                           byref(st)), "prm_train_step_groups")
        return _struct_dict(st)

    def evaluate_groups(self, group_sizes: np.ndarray, features: Optional[np.ndarray] = None,
                        *, tokens: Optional[np.ndarray] = None,
                        lengths: Optional[np.ndarray] = None,
                        prefix_row: Optional[np.ndarray] = None,
                        prefix_len: Optional[np.ndarray] = None, loss: str = "pairwise",
                        weight: Optional[np.ndarray] = None) -> Dict[str, Any]:
        """prm_evaluate_groups; returns the stats."""
        h = self._h()
        g = _arr(group_sizes, np.int32, "group_sizes")
        b = _BatchArgs(features, tokens, lengths, prefix_row, prefix_len)
        ro, keep = _rank_opts(g.shape[0], loss, weight)
        st = _new_stats()
        _check(lib().prm_evaluate_groups(h, byref(b.b), _ptr(g), g.shape[0], byref(ro),
                                         byref(st)), "prm_evaluate_groups")
        return _struct_dict(st)


def _opt_options(**kw: Any) -> OptimizerOptions:
    o = _capi.new_struct(lib(), OptimizerOptions)
    for k, v in kw.items():
        if k == "algorithm" and isinstance(v, str):
            v = ALGORITHMS[v]
        elif k == "schedule" and isinstance(v, str):
            v = SCHEDULES[v]
        elif k not in dict(OptimizerOptions._fields_) or k == "version":
            raise TypeError(f"unknown optimizer option {k!r}")
        setattr(o, k, int(v) if isinstance(v, bool) else v)
    return o


class Optimizer(_Handle):
    """prm_optimizer. ``Optimizer(model, lr=1e-3, algorithm='adamw', ...)``:
    keyword arguments are prm_optimizer_options fields (algorithm
    'sgd'/'adam'/'adamw', schedule 'constant'/'linear'/'cosine').
    Holds a reference to its Model."""

    _free_name = "prm_optimizer_free"

    def __init__(self, model: Model, **options: Any) -> None:
        if not isinstance(model, Model):
            raise TypeError("model must be a prefrm.Model")
        o = _opt_options(**options)
        out = c_void_p()
        _check(lib().prm_optimizer_new(byref(out), model._h(), byref(o)), "prm_optimizer_new")
        self._attach(out.value, model)

    def _attach(self, ptr: int, model: Model) -> None:
        _Handle.__init__(self, ptr)
        self.model = model
        model._children.add(self)

    @classmethod
    def load(cls, model: Model, source: Union[str, bytes]) -> "Optimizer":
        """prm_optimizer_load (a path) or prm_optimizer_load_buffer (bytes)."""
        out = c_void_p()
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
            _check(lib().prm_optimizer_load_buffer(byref(out), model._h(), data, len(data)),
                   "prm_optimizer_load_buffer")
        else:
            _check(lib().prm_optimizer_load(byref(out), model._h(), str(source).encode()),
                   "prm_optimizer_load")
        o = cls.__new__(cls)
        o._attach(out.value, model)
        return o

    def step(self, ctx: Context) -> None:
        """prm_optimizer_step from the gradients accumulated in ctx."""
        _check(lib().prm_optimizer_step(self._h(), ctx._h()), "prm_optimizer_step")

    @property
    def num_updates(self) -> int:
        return lib().prm_optimizer_num_updates(self._h())

    @property
    def lr(self) -> float:
        """prm_optimizer_lr: the rate of the next update."""
        return lib().prm_optimizer_lr(self._h())

    def set_lr(self, lr: float) -> None:
        """prm_optimizer_set_lr: replace the base learning rate."""
        _check(lib().prm_optimizer_set_lr(self._h(), lr), "prm_optimizer_set_lr")

    @property
    def lr_scale(self) -> float:
        return lib().prm_optimizer_lr_scale(self._h())

    def set_lr_scale(self, scale: float) -> None:
        """prm_optimizer_set_lr_scale."""
        _check(lib().prm_optimizer_set_lr_scale(self._h(), scale), "prm_optimizer_set_lr_scale")

    @property
    def last_grad_norm(self) -> float:
        return lib().prm_optimizer_last_grad_norm(self._h())

    @property
    def errmsg(self) -> str:
        """prm_optimizer_errmsg."""
        return lib().prm_optimizer_errmsg(self._h()).decode(errors="replace")

    def save(self, path: str) -> None:
        """prm_optimizer_save."""
        _check(lib().prm_optimizer_save(self._h(), str(path).encode()), "prm_optimizer_save")

    def to_bytes(self) -> bytes:
        """prm_optimizer_save_buffer."""
        h, size = self._h(), c_size_t()
        _check(lib().prm_optimizer_save_buffer(h, None, 0, byref(size)),
               "prm_optimizer_save_buffer")
        buf = ctypes.create_string_buffer(size.value)
        _check(lib().prm_optimizer_save_buffer(h, buf, size.value, byref(size)),
               "prm_optimizer_save_buffer")
        return buf.raw[: size.value]
