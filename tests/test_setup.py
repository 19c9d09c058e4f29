"""The install's choice of what to compile: the CUDA kernels only when nvcc is found and the
installed torch has CUDA, unless GR_FUSED_BUILD_CUDA forces it either way."""
import importlib.util
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("gr_fused_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the helpers; setup() runs only as a script
    return module


@pytest.mark.parametrize("flag,nvcc,torch_cuda,want", [
    ("", True, "13.0", [True, False]),   # nvcc and a CUDA torch: CUDA, host build as fallback
    ("", True, "", [False]),             # a CPU-only torch: the host build only
    ("", True, None, [False]),           # torch not found: the host build only
    ("", False, "13.0", [False]),        # no nvcc
    ("0", True, "13.0", [False]),        # forced off
])
def test_cuda_is_built_only_for_a_torch_that_can_run_it(setup_py, flag, nvcc, torch_cuda, want):
    assert setup_py.cuda_attempts(flag, nvcc, torch_cuda) == want


def test_the_installed_torch_is_found(setup_py):
    assert setup_py.installed_torch_cuda() == (torch.version.cuda or "")
