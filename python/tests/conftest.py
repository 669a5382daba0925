"""Shared fixtures: the library under test is $PREFRM_LIBRARY (run_tests.sh
points it at the build tree); the Python package comes from python/."""
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent  # the repository
sys.path.insert(0, str(HERE.parent))
# one BLAS thread, so the threading measurement is about Python threads
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import prefrm  # noqa: E402


@pytest.fixture(scope="session")
def libpath() -> str:
    prefrm.lib()
    return prefrm._capi.find_library()


@pytest.fixture(scope="session")
def header() -> Path:
    return ROOT / "include" / "prefrm.h"
