"""The README's two commands and its code block work as written: the installs resolve
(pip --dry-run), the main job runs and prints its table, the test command is the one CI
runs, and the training loop trains."""
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
COMMANDS = re.findall(r"```bash\n(.*?)\n```", README, re.S)


def test_the_readme_has_the_two_commands_and_ci_runs_the_test_command():
    assert len(COMMANDS) == 2, COMMANDS
    main_job, tests = COMMANDS
    assert main_job.endswith("python -m gr_fused.profile")
    assert tests.endswith("python -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines(), "CI must run the README's test command as written"


@pytest.mark.parametrize("which", [0, 1], ids=["main-job", "tests"])
def test_the_installs_in_the_commands_resolve(which):
    for part in COMMANDS[which].split("&&"):
        args = shlex.split(part)
        if args[:4] != ["python", "-m", "pip", "install"]:
            continue
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", *args[4:]]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
        assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_main_job_runs_and_prints_its_table():
    last = COMMANDS[0].split("&&")[-1]
    args = shlex.split(last)
    assert args[:2] == ["python", "-m"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)  # as a user runs it
    proc = subprocess.run([sys.executable, *args[1:], "--no-progress"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for method in ("sgd", "fd-gr", "db-gr", "sam-ref"):
        assert f"\n{method} " in proc.stdout
    assert "summary: fd-gr" in proc.stdout


def test_readme_training_loop_runs_and_lowers_the_loss():
    code = re.findall(r"```python\n(.*?)```", README, re.S)[0]
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    model, x, y = scope["model"], scope["x"], scope["y"]
    with torch.no_grad():
        final = float(torch.nn.functional.cross_entropy(model(x), y))
    assert final < 0.6931  # below the loss of a uniform guess over 2 classes
    assert scope["opt"].backends  # a backend was picked and reported
