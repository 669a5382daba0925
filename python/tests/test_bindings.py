"""Every PRM_API function of include/prefrm.h has a ctypes declaration."""
import re

import prefrm
from prefrm import _capi


def header_functions(text: str) -> list:
    # "PRM_API <type> <name>(" possibly with pointer stars; skip the macro's
    # own definition lines (PRM_API __declspec(...) etc.)
    names = re.findall(r"^PRM_API\b[^(;]*?\b(prm_\w+)\s*\(", text, re.M)
    return sorted(set(names))


def test_every_header_function_is_bound(header):
    names = header_functions(header.read_text())
    assert len(names) > 80, names
    missing = [n for n in names if n not in _capi.SIGNATURES]
    assert not missing, f"PRM_API functions without a ctypes binding: {missing}"


def test_every_header_function_is_in_the_library(header):
    # (bindings of functions a header lacks are harmless: load() declares
    # only what the library exports)
    names = set(header_functions(header.read_text()))
    lib = prefrm.lib()
    absent = [n for n in names if not hasattr(lib, n)]
    assert not absent, f"header functions the loaded library does not export: {absent}"


def test_struct_versions_match_header(header):
    text = header.read_text()
    for macro, value in [("PRM_MODEL_OPTIONS_VERSION", _capi.PRM_MODEL_OPTIONS_VERSION),
                         ("PRM_REWARD_MOMENTS_VERSION", _capi.PRM_REWARD_MOMENTS_VERSION),
                         ("PRM_PRETRAINED_OPTIONS_VERSION", _capi.PRM_PRETRAINED_OPTIONS_VERSION),
                         ("PRM_LOAD_REPORT_VERSION", _capi.PRM_LOAD_REPORT_VERSION),
                         ("PRM_BATCH_VERSION", _capi.PRM_BATCH_VERSION),
                         ("PRM_CTX_OPTIONS_VERSION", _capi.PRM_CTX_OPTIONS_VERSION),
                         ("PRM_LOSS_OPTIONS_VERSION", _capi.PRM_LOSS_OPTIONS_VERSION),
                         ("PRM_LOSS_STATS_VERSION", _capi.PRM_LOSS_STATS_VERSION),
                         ("PRM_RANK_OPTIONS_VERSION", _capi.PRM_RANK_OPTIONS_VERSION),
                         ("PRM_OPTIMIZER_OPTIONS_VERSION", _capi.PRM_OPTIMIZER_OPTIONS_VERSION),
                         ("PRM_EVAL_ACCUM_VERSION", _capi.PRM_EVAL_ACCUM_VERSION),
                         ("PRM_EVAL_CALIB_BINS", _capi.PRM_EVAL_CALIB_BINS)]:
        m = re.search(rf"#define {macro} (\d+)", text)
        if m is None and macro.startswith("PRM_EVAL_"):
            continue  # a header from before prm_eval_accum
        assert m and int(m.group(1)) == value, macro


def test_structs_initialise_at_current_version():
    for cls in _capi.STRUCTS:
        if not hasattr(prefrm.lib(), _capi.STRUCTS[cls][0]):
            continue  # reported by test_every_binding_is_in_header_and_library
        s = _capi.new_struct(prefrm.lib(), cls)
        assert s.version == _capi.STRUCTS[cls][1]
    o = _capi.new_struct(prefrm.lib(), _capi.ModelOptions)
    assert o.rope_theta == 10000.0 and o.activation == 2
    oo = _capi.new_struct(prefrm.lib(), _capi.OptimizerOptions)
    assert oo.lr == 1e-3 and oo.beta2 == 0.999 and oo.accumulation_steps == 1


def test_version():
    assert prefrm.version() == "0.5.0" or prefrm.version().count(".") == 2
    assert prefrm.lib().prm_version_number() >= 400
