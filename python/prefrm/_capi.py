"""Raw ctypes declarations of include/prefrm.h.

Every ``PRM_API`` function of the header has an entry in :data:`SIGNATURES`
(restype, argtypes); :func:`load` opens the shared library and declares
them. Pointers to caller buffers are passed as ``c_void_p`` (numpy's
``arr.ctypes.data``), so arrays go in and out without copies. The
``Structure`` classes mirror the current versions of the versioned structs;
always initialise them through the library's ``*_init`` function
(:func:`new_struct`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from ctypes import (POINTER, Structure, c_char_p, c_double, c_float, c_int,
                    c_int32, c_size_t, c_uint32, c_uint64, c_void_p)
from typing import Dict, Optional, Tuple

PRM_MAX_HIDDEN = 16

PRM_MODEL_OPTIONS_VERSION = 2
PRM_REWARD_MOMENTS_VERSION = 1
PRM_PRETRAINED_OPTIONS_VERSION = 1
PRM_LOAD_REPORT_VERSION = 1
PRM_BATCH_VERSION = 2
PRM_CTX_OPTIONS_VERSION = 2
PRM_LOSS_OPTIONS_VERSION = 2
PRM_LOSS_STATS_VERSION = 2
PRM_RANK_OPTIONS_VERSION = 1
PRM_OPTIMIZER_OPTIONS_VERSION = 1
PRM_EVAL_ACCUM_VERSION = 1
PRM_EVAL_CALIB_BINS = 10


class ModelOptions(Structure):
    """prm_model_options, version 2."""
    _fields_ = [
        ("version", c_uint32), ("arch", c_int32), ("seed", c_uint64),
        ("input_size", c_uint64), ("activation", c_int32),
        ("n_hidden", c_uint32), ("hidden", c_uint64 * PRM_MAX_HIDDEN),
        ("vocab_size", c_uint64), ("n_ctx", c_uint64), ("n_embd", c_uint64),
        ("n_layer", c_uint64), ("n_head", c_uint64),
        # version 2
        ("n_kv_head", c_uint64), ("head_dim", c_uint64), ("n_ffn", c_uint64),
        ("rope_theta", c_double), ("rms_eps", c_double),
        ("attn_bias", c_int32), ("qk_norm", c_int32),
    ]


class RewardMoments(Structure):
    """prm_reward_moments, version 1."""
    _fields_ = [("version", c_uint32), ("count", c_uint64),
                ("mean", c_double), ("m2", c_double)]


class PretrainedOptions(Structure):
    """prm_pretrained_options, version 1."""
    _fields_ = [("version", c_uint32), ("config", POINTER(ModelOptions)),
                ("seed", c_uint64), ("fresh_head", c_int32),
                ("ignore_unknown", c_int32)]


class LoadReport(Structure):
    """prm_load_report, version 1."""
    _fields_ = [("version", c_uint32), ("n_loaded", c_uint32),
                ("n_initialised", c_uint32), ("n_ignored", c_uint32),
                ("text", c_void_p), ("text_size", c_size_t),
                ("text_needed", c_size_t)]


class Batch(Structure):
    """prm_batch, version 2."""
    _fields_ = [("version", c_uint32), ("n", c_uint64),
                ("features", c_void_p), ("n_features", c_uint64),
                ("row_stride", c_uint64), ("tokens", c_void_p),
                ("token_stride", c_uint64), ("lengths", c_void_p),
                # version 2
                ("prefix_row", c_void_p), ("prefix_len", c_void_p)]


class CtxOptions(Structure):
    """prm_ctx_options, version 2."""
    _fields_ = [("version", c_uint32), ("inference", c_int32),
                ("max_rows", c_uint64), ("max_len", c_uint64),
                # version 2: threads (parallel_for is a C function pointer,
                # in practice prm_pool_parallel_for's address)
                ("n_workers", c_uint32), ("parallel_for", c_void_p),
                ("parallel_arg", c_void_p)]


class LossOptions(Structure):
    """prm_loss_options, version 2."""
    _fields_ = [("version", c_uint32), ("margin", c_void_p),
                ("label", c_void_p), ("weight", c_void_p),
                ("center_coef", c_double),
                # version 2
                ("tie_model", c_int32), ("tie_param", c_double),
                ("tie", c_void_p)]


class LossStats(Structure):
    """prm_loss_stats, version 2."""
    _fields_ = [("version", c_uint32), ("loss", c_double),
                ("accuracy", c_double), ("reward_mean", c_double),
                ("reward_std", c_double), ("margin_mean", c_double),
                # version 2
                ("brier", c_double), ("ece", c_double),
                ("exact_rate", c_double), ("tie_prob_tied", c_double),
                ("tie_prob_untied", c_double), ("n_compared", c_uint64),
                ("n_tied", c_uint64)]


class RankOptions(Structure):
    """prm_rank_options, version 1."""
    _fields_ = [("version", c_uint32), ("loss", c_int32),
                ("weight", c_void_p)]


class OptimizerOptions(Structure):
    """prm_optimizer_options, version 1."""
    _fields_ = [("version", c_uint32), ("algorithm", c_int32),
                ("lr", c_double), ("beta1", c_double), ("beta2", c_double),
                ("eps", c_double), ("weight_decay", c_double),
                ("momentum", c_double), ("nesterov", c_int32),
                ("no_decay_1d", c_int32), ("max_grad_norm", c_double),
                ("schedule", c_int32), ("accumulation_steps", c_uint32),
                ("warmup_steps", c_uint64), ("total_steps", c_uint64),
                ("min_lr", c_double)]


class EvalAccum(Structure):
    """prm_eval_accum, version 1."""
    _fields_ = [("version", c_uint32), ("kind", c_int32),
                ("n_units", c_uint64), ("loss_sum", c_double),
                ("n_rewards", c_uint64), ("reward_mean", c_double),
                ("reward_m2", c_double), ("n_compared", c_uint64),
                ("wins", c_double), ("margin_sum", c_double),
                ("brier_sum", c_double),
                ("calib_p", c_double * PRM_EVAL_CALIB_BINS),
                ("calib_y", c_double * PRM_EVAL_CALIB_BINS),
                ("n_exact", c_uint64), ("n_tied", c_uint64),
                ("tie_prob_tied_sum", c_double),
                ("tie_prob_untied_sum", c_double)]


# (struct class, init function, current version)
STRUCTS = {
    ModelOptions: ("prm_model_options_init", PRM_MODEL_OPTIONS_VERSION),
    RewardMoments: ("prm_reward_moments_init", PRM_REWARD_MOMENTS_VERSION),
    PretrainedOptions: ("prm_pretrained_options_init",
                        PRM_PRETRAINED_OPTIONS_VERSION),
    Batch: ("prm_batch_init", PRM_BATCH_VERSION),
    CtxOptions: ("prm_ctx_options_init", PRM_CTX_OPTIONS_VERSION),
    LossOptions: ("prm_loss_options_init", PRM_LOSS_OPTIONS_VERSION),
    LossStats: ("prm_loss_stats_init", PRM_LOSS_STATS_VERSION),
    RankOptions: ("prm_rank_options_init", PRM_RANK_OPTIONS_VERSION),
    OptimizerOptions: ("prm_optimizer_options_init",
                       PRM_OPTIMIZER_OPTIONS_VERSION),
    EvalAccum: ("prm_eval_accum_init", PRM_EVAL_ACCUM_VERSION),
}

_p = c_void_p          # any pointer: handles, caller buffers
_pu64 = POINTER(c_uint64)
_pu32 = POINTER(c_uint32)
_psize = POINTER(c_size_t)

#: name -> (restype, argtypes) for every PRM_API function of prefrm.h
SIGNATURES: Dict[str, Tuple[Optional[type], list]] = {
    "prm_version_number": (c_uint32, []),
    "prm_version_string": (c_char_p, []),
    "prm_status_string": (c_char_p, [c_int]),
    "prm_last_errmsg": (c_char_p, []),
    # models
    "prm_model_options_init": (c_int, [POINTER(ModelOptions), c_uint32]),
    "prm_model_new": (c_int, [POINTER(_p), POINTER(ModelOptions)]),
    "prm_model_free": (None, [_p]),
    "prm_model_get_options": (c_int, [_p, POINTER(ModelOptions)]),
    "prm_model_arch": (c_int32, [_p]),
    "prm_model_input_size": (c_uint64, [_p]),
    "prm_model_num_params": (c_uint64, [_p]),
    "prm_model_max_len": (c_uint64, [_p]),
    "prm_model_vocab_size": (c_uint64, [_p]),
    "prm_model_params": (POINTER(c_float), [_p, _pu64]),
    "prm_model_num_tensors": (c_uint32, [_p]),
    "prm_model_tensor_info": (c_int, [_p, c_uint32, POINTER(c_char_p), _pu64,
                                      _pu32, _pu64]),
    "prm_model_find_tensor": (c_int, [_p, c_char_p, _pu32]),
    "prm_model_read_tensor": (c_int, [_p, c_uint32, _p, c_uint64]),
    "prm_model_write_tensor": (c_int, [_p, c_uint32, _p, c_uint64]),
    "prm_model_read_params": (c_int, [_p, c_uint64, _p, c_uint64]),
    "prm_model_write_params": (c_int, [_p, c_uint64, _p, c_uint64]),
    "prm_model_set_trainable": (c_int, [_p, c_int32]),
    "prm_model_trainable_offset": (c_uint64, [_p]),
    "prm_reward_moments_init": (c_int, [POINTER(RewardMoments), c_uint32]),
    "prm_reward_moments_add": (c_int, [POINTER(RewardMoments), _p, c_uint64]),
    "prm_model_set_reward_norm": (c_int, [_p, POINTER(RewardMoments)]),
    "prm_model_reward_norm": (c_int, [_p, POINTER(c_double),
                                      POINTER(c_double)]),
    "prm_model_normalise_rewards": (c_int, [_p, _p, c_uint64]),
    "prm_model_errmsg": (c_char_p, [_p]),
    "prm_model_save": (c_int, [_p, c_char_p]),
    "prm_model_save_buffer": (c_int, [_p, _p, c_size_t, _psize]),
    "prm_model_load": (c_int, [POINTER(_p), c_char_p]),
    "prm_model_load_buffer": (c_int, [POINTER(_p), _p, c_size_t]),
    "prm_pretrained_options_init": (c_int, [POINTER(PretrainedOptions),
                                            c_uint32]),
    "prm_model_load_pretrained": (c_int, [POINTER(_p), c_char_p,
                                          POINTER(PretrainedOptions),
                                          POINTER(LoadReport)]),
    "prm_model_load_pretrained_buffer": (c_int, [POINTER(_p), _p, c_size_t,
                                                 POINTER(PretrainedOptions),
                                                 POINTER(LoadReport)]),
    # batches and contexts
    "prm_batch_init": (c_int, [POINTER(Batch), c_uint32]),
    "prm_ctx_options_init": (c_int, [POINTER(CtxOptions), c_uint32]),
    "prm_ctx_new": (c_int, [POINTER(_p), _p, POINTER(CtxOptions)]),
    "prm_ctx_free": (None, [_p]),
    "prm_pool_new": (c_int, [POINTER(_p), c_uint32]),
    "prm_pool_free": (None, [_p]),
    "prm_pool_size": (c_uint32, [_p]),
    "prm_pool_parallel_for": (None, [_p, c_uint32, _p, _p]),
    "prm_ctx_model": (_p, [_p]),
    "prm_ctx_max_rows": (c_uint64, [_p]),
    "prm_ctx_max_len": (c_uint64, [_p]),
    "prm_ctx_is_inference": (c_int32, [_p]),
    "prm_ctx_num_grads": (c_uint64, [_p]),
    "prm_ctx_tokens_computed": (c_uint64, [_p]),
    "prm_ctx_errmsg": (c_char_p, [_p]),
    "prm_ctx_forward": (c_int, [_p, POINTER(Batch), _p, c_uint64]),
    "prm_ctx_backward": (c_int, [_p, _p, c_uint64]),
    "prm_ctx_zero_grad": (c_int, [_p]),
    "prm_ctx_grads": (POINTER(c_float), [_p, _pu64]),
    "prm_ctx_read_grads": (c_int, [_p, c_uint64, _p, c_uint64]),
    "prm_ctx_write_grads": (c_int, [_p, c_uint64, _p, c_uint64]),
    "prm_ctx_read_grad": (c_int, [_p, c_uint32, _p, c_uint64]),
    "prm_ctx_write_grad": (c_int, [_p, c_uint32, _p, c_uint64]),
    # losses
    "prm_loss_options_init": (c_int, [POINTER(LossOptions), c_uint32]),
    "prm_loss_stats_init": (c_int, [POINTER(LossStats), c_uint32]),
    "prm_loss_bt": (c_int, [_p, _p, c_uint64, POINTER(LossOptions),
                            POINTER(c_double), POINTER(LossStats), _p, _p]),
    "prm_rank_options_init": (c_int, [POINTER(RankOptions), c_uint32]),
    "prm_loss_rank": (c_int, [_p, c_uint64, _p, c_uint64,
                              POINTER(RankOptions), POINTER(c_double),
                              POINTER(LossStats), _p]),
    # optimizers
    "prm_optimizer_options_init": (c_int, [POINTER(OptimizerOptions),
                                           c_uint32]),
    "prm_optimizer_new": (c_int, [POINTER(_p), _p,
                                  POINTER(OptimizerOptions)]),
    "prm_optimizer_free": (None, [_p]),
    "prm_optimizer_step": (c_int, [_p, _p]),
    "prm_optimizer_num_updates": (c_uint64, [_p]),
    "prm_optimizer_lr": (c_double, [_p]),
    "prm_optimizer_set_lr": (c_int, [_p, c_double]),
    "prm_optimizer_set_lr_scale": (c_int, [_p, c_double]),
    "prm_optimizer_lr_scale": (c_double, [_p]),
    "prm_optimizer_last_grad_norm": (c_double, [_p]),
    "prm_optimizer_errmsg": (c_char_p, [_p]),
    "prm_optimizer_save": (c_int, [_p, c_char_p]),
    "prm_optimizer_save_buffer": (c_int, [_p, _p, c_size_t, _psize]),
    "prm_optimizer_load": (c_int, [POINTER(_p), _p, c_char_p]),
    "prm_optimizer_load_buffer": (c_int, [POINTER(_p), _p, _p, c_size_t]),
    # one-call training and evaluation
    "prm_train_step": (c_int, [_p, _p, POINTER(Batch), POINTER(LossOptions),
                               POINTER(LossStats)]),
    "prm_evaluate": (c_int, [_p, POINTER(Batch), POINTER(LossOptions),
                             POINTER(LossStats)]),
    "prm_train_step_groups": (c_int, [_p, _p, POINTER(Batch), _p, c_uint64,
                                      POINTER(RankOptions),
                                      POINTER(LossStats)]),
    "prm_evaluate_groups": (c_int, [_p, POINTER(Batch), _p, c_uint64,
                                    POINTER(RankOptions),
                                    POINTER(LossStats)]),
    # evaluation over many batches
    "prm_eval_accum_init": (c_int, [POINTER(EvalAccum), c_uint32]),
    "prm_evaluate_accum": (c_int, [_p, POINTER(Batch), POINTER(LossOptions),
                                   POINTER(EvalAccum)]),
    "prm_evaluate_groups_accum": (c_int, [_p, POINTER(Batch), _p, c_uint64,
                                          POINTER(RankOptions),
                                          POINTER(EvalAccum)]),
    "prm_eval_accum_stats": (c_int, [POINTER(EvalAccum),
                                     POINTER(LossStats)]),
    # token batches
    "prm_tokens_gather": (c_int, [POINTER(c_int32), c_uint64, c_uint64,
                                  POINTER(POINTER(c_int32)), POINTER(c_int32),
                                  c_int32]),
}


def find_library(path: Optional[str] = None) -> str:
    """Where to load libprefrm from: `path`, else $PREFRM_LIBRARY, else the
    system loader's answer (ctypes.util.find_library, 'libprefrm.so.0')."""
    if path:
        return str(path)
    env = os.environ.get("PREFRM_LIBRARY")
    if env:
        return env
    return ctypes.util.find_library("prefrm") or "libprefrm.so.0"


def load(path: Optional[str] = None) -> ctypes.CDLL:
    """Open libprefrm and declare every function of :data:`SIGNATURES` that
    it exports (a library older than this binding lacks newer functions;
    calling one raises AttributeError)."""
    lib = ctypes.CDLL(find_library(path))
    for name, (restype, argtypes) in SIGNATURES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            continue
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


def new_struct(lib: ctypes.CDLL, cls: type) -> Structure:
    """A struct of class `cls` filled by its library init function at the
    version this binding mirrors."""
    init, version = STRUCTS[cls]
    s = cls()
    rc = getattr(lib, init)(ctypes.byref(s), version)
    if rc != 0:
        raise RuntimeError(f"{init} failed with status {rc}")
    return s


def new_struct_plain(cls: type, version: int) -> Structure:
    """A zeroed struct with only its version set, for structs the library
    fills and that have no init function (prm_load_report)."""
    s = cls()
    s.version = version
    return s
