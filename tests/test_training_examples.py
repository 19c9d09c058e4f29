"""The training examples run end to end (a few steps each), so they cannot rot."""
import importlib.util
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv", [
    ["--dtype", "fp16", "--steps", "6", "--check-resume"],
    ["--dtype", "bf16", "--steps", "4", "--micro", "2", "--clip", "1.0", "--check-resume"],
])
def test_train_amp_example(argv, capsys):
    losses = load("train_amp").main(argv)
    assert len(losses) == int(argv[argv.index("--steps") + 1])
    assert "bit for bit" in capsys.readouterr().out


@pytest.mark.parametrize("mode", [[], ["--fsdp2", "--clip", "1.0"]])
def test_train_ddp_example_spawns_two_ranks(mode):
    """DDP global ascent and FSDP2 (local ascent's function is checked in
    test_training_dist.py)."""
    cmd = [sys.executable, str(EXAMPLES / "train_ddp.py"), "--spawn", "2", "--steps", "2"]
    run = subprocess.run(cmd + mode, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "replicas identical" in run.stdout


def test_train_lightning_example():
    pytest.importorskip("lightning", reason="lightning is not installed (pip install lightning)")
    trainer = load("train_lightning").main(["--steps", "3", "--manual"])
    assert trainer.global_step == 3
