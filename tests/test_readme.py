"""The README's training loop runs as written and trains."""
import pathlib
import re


def test_readme_training_loop_runs_and_lowers_the_loss():
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", readme, re.S)[0]
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    model, x, y = scope["model"], scope["x"], scope["y"]
    import torch
    final = float(torch.nn.functional.cross_entropy(model(x), y))
    assert final < 0.6931  # below the loss of a uniform guess over 2 classes
    assert scope["opt"].backends  # a backend was picked and reported
