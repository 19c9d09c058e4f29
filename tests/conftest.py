"""Test configuration. Without a GPU the Triton kernels run under the Triton interpreter,
which must be switched on before any kernel is defined, i.e. before gr_fused's Triton
module is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402



@pytest.fixture(autouse=True)
def _seeded():
    """Fresh random inputs every run (docs/design.md §5), reproducible from the printed seed."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    yield seed


def pytest_report_header(config):
    return [f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"]
