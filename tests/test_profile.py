"""Tests of the FD-vs-DB profiler, gr_fused.profile (CLI and compare())."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from gr_fused import backends
from gr_fused.profile import (BUILTIN_MODELS, GR_METHODS, METHODS, Hyperparameters, compare,
                              format_table, make_plan, write_csv, write_json)
from gr_fused.profile.__main__ import main
from gr_fused.profile.measure import measure_peak_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2 ** 20

# A small MLP whose matmul FLOPs are easy to count by hand: Linear 20→16→16→10, batch 8.
BATCH, SIZES = 8, (20, 16, 16, 10)
MLP_OPTIONS = dict(in_features=SIZES[0], width=SIZES[1], depth=len(SIZES) - 1)


@pytest.fixture(scope="module")
def mlp_report():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"profile seed {seed}")
    return compare("mlp", device="cpu", batch_size=BATCH, model_options=MLP_OPTIONS,
                   backends="torch", warmup=1, repeat=3, seed=seed, progress=False,
                   hyperparameters=Hyperparameters(lr=0.05))


def by_method(report):
    return {r["method"]: r for r in report["results"]}


def test_flops_match_hand_count_for_mlp(mlp_report):
    # Linear(in, out) on a batch B: forward 2·B·in·out; backward 2·B·in·out for the weight
    # gradient and 2·B·in·out for the input gradient, which autograd skips for the first
    # layer (its input needs no gradient).
    layer = [2 * BATCH * n_in * n_out for n_in, n_out in zip(SIZES[:-1], SIZES[1:])]
    forward = sum(layer)
    sgd = forward + forward + (forward - layer[0])
    r = by_method(mlp_report)
    assert mlp_report["forward_flops"] == forward
    assert r["sgd"]["flops"] == sgd
    for method in ("fd-gr", "bd-gr", "sam", "sam-ref"):
        assert r[method]["flops"] == 2 * sgd, method
    assert r["central-gr"]["flops"] == 3 * sgd
    assert r["db-gr"]["flops"] > r["fd-gr"]["flops"]
    for method, multiple in (("sgd", 3), ("fd-gr", 6), ("central-gr", 9), ("db-gr", 9)):
        assert r[method]["analytic_flops"] == multiple * forward
        assert r[method]["flops_per_forward"] == r[method]["flops"] / forward


def test_every_method_trains(mlp_report):
    r = by_method(mlp_report)
    assert set(r) == set(METHODS)
    for method, result in r.items():
        assert result["loss_last"] < result["loss_first"], method
        assert result["skipped_steps"] == 0, method
    for method in GR_METHODS + ("db-gr", "sam-ref"):  # not the plain SGD step in disguise
        assert r[method]["loss_last"] != r["sgd"]["loss_last"], method


def test_ratios_and_memory(mlp_report):
    r = by_method(mlp_report)
    assert r["sgd"]["ratio_to_sgd"] == 1 and r["db-gr"]["ratio_to_db_gr"] == 1
    for result in r.values():
        assert result["ratio_to_sgd"] == pytest.approx(result["step_time_ms"]
                                                       / r["sgd"]["step_time_ms"])
    # The GR optimizer and the SAM pattern both keep a copy of θ (docs/design.md §3).
    param_bytes = 4 * sum(n_in * n_out + n_out for n_in, n_out in zip(SIZES[:-1], SIZES[1:]))
    for method in ("fd-gr", "sam-ref"):
        assert r[method]["peak_memory_bytes"] >= r["sgd"]["peak_memory_bytes"] + param_bytes
    assert r["db-gr"]["peak_memory_bytes"] > r["sgd"]["peak_memory_bytes"]


def test_cpu_peak_memory_counts_what_was_built_and_the_run_peak():
    earlier = [torch.empty(MIB // 4)]  # 1 MiB from before: neither it nor its free counts
    held = []

    def build():
        held.append(torch.empty(MIB // 4))  # 1 MiB, kept

    def run():
        earlier.clear()
        temp = torch.empty(MIB // 2)  # 2 MiB while it lives: 1 + 2 MiB at once
        del temp
        held.append(torch.empty(MIB // 8))  # 0.5 MiB, kept: 1.5 MiB at the end

    assert measure_peak_memory(build, run, torch.device("cpu")) == 3 * MIB
    # a run that allocates nothing: the peak is what the build keeps
    assert measure_peak_memory(build, lambda: None, torch.device("cpu")) == MIB


def test_json_and_csv_schema(mlp_report, tmp_path):
    write_json(mlp_report, tmp_path / "r.json")
    write_csv(mlp_report, tmp_path / "r.csv")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["device"] == "cpu" and data["model"] == "mlp"
    assert data["torch_version"] == torch.__version__ and data["batch_size"] == BATCH
    assert [(r["method"], r["backend"]) for r in data["results"]] == [
        ("sgd", "torch.optim"), ("fd-gr", "torch"), ("fd-gr-k5", "torch"), ("bd-gr", "torch"),
        ("central-gr", "torch"), ("db-gr", "torch.optim"), ("sam", "torch"),
        ("sam-ref", "torch.optim")]
    for r in data["results"]:
        assert r["step_time_ms"] > 0 and r["peak_memory_bytes"] > 0
        # an fd-gr-kN cycle's FLOPs per step are an average
        assert isinstance(r["flops"], float if "-k" in r["method"] else int) and r["flops"] > 0
    with open(tmp_path / "r.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["method"] for row in rows] == [r["method"] for r in data["results"]]
    for row, r in zip(rows, data["results"]):
        assert row["device"] == "cpu" and row["model"] == "mlp"
        assert float(row["flops"]) == r["flops"]
        assert int(row["peak_memory_bytes"]) == r["peak_memory_bytes"]
        assert float(row["step_time_ms"]) == pytest.approx(r["step_time_ms"])


def test_table_shows_every_method_and_what_is_measured(mlp_report):
    table = format_table(mlp_report)
    for method in METHODS:
        assert f"\n{method} " in table
    assert "median of 3 steps" in table and "torch.profiler" in table
    assert "FlopCounterMode" in table and "summary: fd-gr (torch)" in table


@pytest.mark.parametrize("model, dtype, options", [
    ("cnn", "float32", dict(width=4)),  # conv, BatchNorm
    ("gpt", "bf16-autocast", dict(n_layer=1, n_embd=16, n_head=2, seq_len=8, vocab=32)),
])
def test_builtin_models_run_every_method(model, dtype, options):
    report = compare(model, device="cpu", dtype=dtype, batch_size=4,
                     model_options=options, backends="torch", warmup=0, repeat=1,
                     progress=False)
    r = by_method(report)
    assert set(r) == set(METHODS)
    for result in r.values():
        assert torch.isfinite(torch.tensor([result["loss_first"], result["loss_last"]])).all()
    assert r["fd-gr"]["flops"] == r["bd-gr"]["flops"] == r["sam-ref"]["flops"] \
        == 2 * r["sgd"]["flops"]
    assert r["central-gr"]["flops"] == 3 * r["sgd"]["flops"]
    assert r["db-gr"]["flops"] > r["fd-gr"]["flops"]


@pytest.mark.parametrize("model, options", [
    ("resnet18", dict(width=2)), ("wrn28-10", dict(depth=10, width=1))])
def test_builtin_resnets_train(model, options):
    report = compare(model, device="cpu", batch_size=2, model_options=options,
                     methods="sgd", warmup=0, repeat=1, progress=False)
    (result,) = report["results"]
    assert result["flops"] == pytest.approx(3 * report["forward_flops"], rel=0.1)
    assert result["loss_last"] < result["loss_first"]


def test_builtin_model_sizes_are_the_published_ones():
    # Parameter counts of the standard models: ResNet-18 for CIFAR 11,173,962; WRN-28-10
    # 36,479,194; GPT-2 small 124,439,808 with its 1024 positions (the default 512 has
    # 512·768 fewer). Built on the meta device, so nothing is allocated.
    expected = {"resnet18": 11_173_962, "wrn28-10": 36_479_194,
                "gpt": 124_439_808 - 512 * 768}
    for name, count in expected.items():
        builtin = BUILTIN_MODELS[name]
        model, _, _ = builtin.factory(1, "meta", **builtin.full)
        assert sum(p.numel() for p in model.parameters()) == count, name


def test_cpu_defaults_are_reduced_and_say_so():
    plan = make_plan("gpt", device="cpu")
    assert plan.model_options["n_layer"] < BUILTIN_MODELS["gpt"].full["n_layer"]
    assert "reduced for CPU" in plan.size_note and "n_layer=12" in plan.size_note
    plan = make_plan("gpt", device="cpu", model_options=dict(n_layer=3))
    assert plan.model_options["n_layer"] == 3 and "n_layer" not in plan.size_note
    assert make_plan("mlp", device="cpu").size_note == ""


def test_default_backends_are_every_one_that_can_run():
    cpu = torch.device("cpu")
    names = [n for n in backends.names() if n != "auto"]
    runnable = [n for n in names if backends.unavailable_reason(n, cpu) is None]
    plan = make_plan("mlp", device="cpu", methods="sgd,fd-gr,central-gr")
    assert plan.runs == ([("sgd", "torch.optim")] + [("fd-gr", n) for n in runnable]
                         + [("central-gr", n) for n in runnable])
    assert sorted(plan.skipped_backends) == sorted(set(names) - set(runnable))
    assert make_plan("mlp", device="cpu", methods="db-gr").runs == [("db-gr", "torch.optim")]


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "gr_fused.profile", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_cli_end_to_end_writes_json_csv_png(tmp_path):
    # --backend torch: the compiled backends may build on first use, which is not timed here
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the [bench] extra)")
    out = run_cli("--model", "mlp", "--width", "16", "--depth", "2", "--batch-size", "8",
                  "--device", "cpu", "--backend", "torch", "--warmup", "0", "--repeat", "2",
                  "--no-progress",
                  "--json", str(tmp_path / "p.json"), "--csv", str(tmp_path / "p.csv"),
                  "--plot", str(tmp_path / "p.png"))
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "p.json").read_text())
    methods = [r["method"] for r in data["results"]]
    assert set(methods) == set(METHODS)
    assert data["command"].startswith("python -m gr_fused.profile --model mlp")
    with open(tmp_path / "p.csv", newline="") as f:
        assert [row["method"] for row in csv.DictReader(f)] == methods
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for method in METHODS:
        assert f"\n{method} " in out.stdout


def test_interval_methods_report_whole_cycles():
    """fd-gr-k5: each measurement is a cycle of 5 steps (one FD step, four one-gradient
    steps) reported per step, so its FLOPs are (2 + 4)/5 gradients' worth and the paper's
    count (6 + 4·3)/5 forwards; any fd-gr-kN can be asked for."""
    report = compare("mlp", device="cpu", methods="sgd,fd-gr,fd-gr-k5,fd-gr-k3", backends="torch",
                     warmup=0, repeat=2, progress=False, batch_size=BATCH,
                     model_options=MLP_OPTIONS)
    r = {x["method"]: x for x in report["results"]}
    assert r["fd-gr-k5"]["flops"] == pytest.approx(r["sgd"]["flops"] * 6 / 5)
    assert r["fd-gr-k3"]["flops"] == pytest.approx(r["sgd"]["flops"] * 4 / 3)
    assert r["fd-gr-k5"]["analytic_flops_per_forward"] == pytest.approx((6 + 12) / 5)
    with pytest.raises(ValueError, match="fd-gr-kN"):
        compare("mlp", device="cpu", methods="fd-gr-k1")


def test_plot_shows_the_spread_of_the_timed_steps(tmp_path):
    """Each step-time bar carries an error bar from the fastest to the slowest timed step."""
    pytest.importorskip("matplotlib")
    from gr_fused.profile.report import plot_figure
    results = [dict(method=m, backend="torch", step_time_ms=10.0 * (i + 1),
                    step_time_ms_min=10.0 * (i + 1) - 1 - i, step_time_ms_max=10.0 * (i + 1) + 2 * i,
                    ratio_to_sgd=1.0 + i, peak_memory_bytes=1 << 20)
               for i, m in enumerate(("sgd", "fd-gr"))]
    report = dict(results=results, model="mlp", batch_size=8, dtype="float32", device="cpu",
                  device_name="cpu")
    fig = plot_figure(report)
    ax = fig.axes[0]
    bars = [c for c in ax.containers if hasattr(c, "errorbar") and c.errorbar is not None]
    assert len(bars) == 1
    segments = bars[0].errorbar.lines[2][0].get_segments()
    for (low, high), r in zip(([s[0][1], s[1][1]] for s in segments), results):
        assert low == pytest.approx(r["step_time_ms_min"]) and high == pytest.approx(r["step_time_ms_max"])


def test_cli_user_factory_with_size_option(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(REPO)  # as `python -m` run from the repository root has it
    assert main(["--model", "tests.profile_user_model:factory", "--width", "5",
                 "--methods", "sgd,fd-gr,db-gr", "--backend", "torch", "--device", "cpu",
                 "--warmup", "0", "--repeat", "2", "--no-progress",
                 "--json", str(tmp_path / "u.json")]) == 0
    assert "tests.profile_user_model:factory" in capsys.readouterr().out
    data = json.loads((tmp_path / "u.json").read_text())
    assert data["model"] == "tests.profile_user_model:factory"
    assert data["parameters"] == 6 * 5 + 5 + 5 + 1
    assert [r["method"] for r in data["results"]] == ["sgd", "fd-gr", "db-gr"]
    assert all(r["loss_last"] < r["loss_first"] for r in data["results"])


@pytest.mark.parametrize("args, message", [
    (["--model", "nosuch"], "Invalid model: 'nosuch' (built-in: mlp, cnn, resnet18"),
    (["--methods", "sgd,nosuch"], "Invalid methods: 'nosuch'"),
    (["--backend", "nosuch"], "Invalid backend: 'nosuch'"),
    (["--dtype", "int8"], "Invalid dtype: 'int8'"),
    (["--model", "tests.no_such_module:factory"], "cannot import 'tests.no_such_module'"),
    (["--model", "tests.profile_user_model:nothing"], "no callable 'nothing'"),
    (["--model", "gpt", "--width", "8"], "Invalid model option for gpt: width"),
    (["--repeat", "0"], "Invalid repeat: 0"),
    (["--device", "tpu"], "Invalid device"),
])
def test_cli_bad_input_exits_nonzero_with_clear_error(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--device", "cpu", "--no-progress"] if "--device" not in args
             else [*args, "--no-progress"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_api_bad_input_raises_value_error():
    with pytest.raises(ValueError, match="Invalid model"):
        compare("nosuch", device="cpu")
    with pytest.raises(ValueError, match="Invalid methods"):
        compare("mlp", device="cpu", methods=["fd-gr", "fdgr"])


# --------------------------------------------------------------------------- fixed bugs
def test_plot_gives_every_method_and_backend_its_own_bar():
    """Rows that differ only by backend (fd-gr-kN, sam as well as fd-gr) get distinct labels
    and distinct bars."""
    pytest.importorskip("matplotlib")
    from gr_fused.profile.report import plot_figure, plot_labels
    rows = [("sgd", "torch.optim"), ("fd-gr", "cpu"), ("fd-gr", "torch"), ("fd-gr-k5", "cpu"),
            ("fd-gr-k5", "torch"), ("sam", "cpu"), ("sam", "torch"), ("db-gr", "torch.optim")]
    results = [dict(method=m, backend=b, step_time_ms=1.0 + i, step_time_ms_min=1.0 + i,
                    step_time_ms_max=1.0 + i, ratio_to_sgd=1.0 + i, peak_memory_bytes=1 << 20)
               for i, (m, b) in enumerate(rows)]
    labels = plot_labels(results)
    assert len(set(labels)) == len(rows)
    assert labels[0] == "sgd" and labels[-1] == "db-gr"
    for label, (method, backend) in zip(labels[1:-1], rows[1:-1]):
        assert label == f"{method}\n({backend})"
    fig = plot_figure(dict(results=results, model="mlp", batch_size=8, dtype="float32",
                           device="cpu", device_name="cpu"))
    for ax in fig.axes[:2]:
        xs = [patch.get_x() + patch.get_width() / 2 for patch in ax.patches]
        assert len(xs) == len(rows) and len(set(xs)) == len(rows)
        assert [t.get_text() for t in ax.get_xticklabels()] == labels


QUICK = ["--methods", "sgd", "--warmup", "0", "--repeat", "1", "--no-progress", "--device", "cpu"]


@pytest.mark.parametrize("args, message", [
    (["--model", "mlp", "--width", "-4"], "Invalid width: -4"),
    (["--model", "cnn", "--width", "0"], "Invalid width: 0"),
    (["--model", "gpt", "--n-head", "5", "--n-layer", "1", "--n-embd", "16", "--seq-len", "4",
      "--vocab", "8"], "Invalid n_head: 5"),
    (["--model", "wrn28-10", "--depth", "11", "--width", "1"], "Invalid depth: 11"),
    (["--model", "mlp", "--width", "4", "--lr", "inf"], "Invalid lr: inf"),
    (["--model", "mlp", "--width", "4", "--gamma", "inf"], "Invalid gamma: inf"),
    (["--model", "mlp", "--width", "4", "--momentum", "nan"], "Invalid momentum: nan"),
    (["--model", "mlp", "--width", "4", "--gamma", "0"], "GR is off"),
])
def test_cli_bad_sizes_and_hyperparameters_are_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*args, *QUICK])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--json", "--csv", "--plot"])
def test_cli_output_path_that_is_a_folder_is_refused_up_front(flag, tmp_path, capsys):
    if flag == "--plot":
        pytest.importorskip("matplotlib")
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "mlp", "--width", "4", flag, str(tmp_path), *QUICK])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "is a folder" in captured.err and captured.out == ""  # nothing was run


BAD_FACTORIES = '''
import torch
import torch.nn as nn
import torch.nn.functional as F


def tiny(batch_size, device, width=4):
    model = nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, 3))
    batch = (torch.randn(batch_size, 6), torch.randint(0, 3, (batch_size,)))
    return model, batch, lambda m, b: F.cross_entropy(m(b[0]), b[1])


def bad_return(batch_size, device):
    return nn.Linear(2, 2), torch.randn(3, 2)


def loss_not_scalar(batch_size, device):
    return nn.Linear(2, 1), torch.randn(batch_size, 2), lambda model, b: model(b)


def all_frozen(batch_size, device):
    model, batch, loss_fn = tiny(batch_size, device)
    model.requires_grad_(False)
    return model, batch, loss_fn
'''


@pytest.mark.parametrize("args, message", [
    (["--model", "badfactories:bad_return"], "must return (model, batch, loss_fn)"),
    (["--model", "badfactories:loss_not_scalar"], "must return a 0-dim tensor"),
    (["--model", "badfactories:all_frozen"], "has no trainable parameters"),
    (["--model", "badfactories:tiny", "--depth", "3"], "unexpected keyword argument 'depth'"),
])
def test_cli_user_factory_breaking_the_contract_is_a_usage_error(args, message, tmp_path,
                                                                  monkeypatch, capsys):
    (tmp_path / "badfactories.py").write_text(BAD_FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--batch-size", "2", *QUICK])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: Invalid model" in err and message in err


class _NoDoubleBackward(torch.autograd.Function):
    """tanh whose backward is an op with no backward of its own (like F.ctc_loss or a
    fused kernel): one gradient works, double backpropagation does not."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return _TanhGrad.apply(x, grad)


class _TanhGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, grad):
        return grad * (1 - torch.tanh(x) ** 2)

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError("derivative for tanh_grad is not implemented")


def no_double_backward_factory(batch_size, device, width=4):
    model = torch.nn.Sequential(torch.nn.Linear(6, width), torch.nn.Linear(width, 3))
    batch = (torch.randn(batch_size, 6), torch.randint(0, 3, (batch_size,)))

    def loss_fn(m, b):
        return torch.nn.functional.cross_entropy(m[1](_NoDoubleBackward.apply(m[0](b[0]))),
                                                 b[1])
    return model, batch, loss_fn


@pytest.mark.parametrize("sequential", [False, True])
def test_method_that_cannot_run_on_the_model_is_reported_and_the_rest_run(sequential, tmp_path):
    report = compare(no_double_backward_factory, device="cpu", batch_size=4,
                     methods="sgd,fd-gr,db-gr", backends="torch", warmup=1, repeat=1,
                     sequential=sequential, progress=False)
    assert [(r["method"], r["backend"]) for r in report["results"]] == [
        ("sgd", "torch.optim"), ("fd-gr", "torch")]
    (failed,) = report["not_runnable"]
    assert failed["method"] == "db-gr" and failed["backend"] == "torch.optim"
    assert "derivative for tanh_grad is not implemented" in failed["reason"]
    assert "\n" not in failed["reason"]
    assert all(r["ratio_to_db_gr"] is None for r in report["results"])
    table = format_table(report)
    assert "\nsgd " in table and "\nfd-gr " in table
    assert "db-gr (torch.optim) not run: " in table
    write_json(report, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["not_runnable"] == [failed]


def test_a_model_that_fails_for_every_method_still_raises():
    """A bug in the model (its loss raises) is not hidden as 'not runnable'."""
    def broken(batch_size, device):
        def loss_fn(m, b):
            raise RuntimeError("bug in the user's loss")
        return torch.nn.Linear(2, 1), torch.randn(batch_size, 2), loss_fn

    with pytest.raises(RuntimeError, match="bug in the user's loss"):
        compare(broken, device="cpu", batch_size=2, methods="sgd", warmup=0, repeat=1,
                progress=False)


def test_json_writes_null_for_non_finite_numbers(mlp_report, tmp_path):
    import copy
    report = copy.deepcopy(mlp_report)
    report["results"][0]["loss_last"] = float("nan")
    report["results"][1]["loss_first"] = float("inf")
    write_json(report, tmp_path / "r.json")

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")
    data = json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse)
    assert data["results"][0]["loss_last"] is None and data["results"][1]["loss_first"] is None
    assert data["results"][0]["loss_first"] == report["results"][0]["loss_first"]


def test_repeated_interval_methods_are_profiled_once_in_the_given_order():
    plan = make_plan("mlp", device="cpu", methods="fd-gr-k7,sgd,fd-gr-k3,fd-gr-k7,sgd,fd-gr-k3",
                     backends="torch")
    assert plan.runs == [("sgd", "torch.optim"), ("fd-gr-k7", "torch"), ("fd-gr-k3", "torch")]


@pytest.mark.parametrize("kwargs, message", [
    (dict(methods=[5]), "Invalid methods: 5"),
    (dict(methods=["sgd", None]), "Invalid methods: None"),
    (dict(methods=5), "Invalid methods: 5"),
    (dict(methods="fd-gr", backends=["torch", 3]), "Invalid backends: 3"),
    (dict(hyperparameters=Hyperparameters(lr=float("inf"))), "Invalid lr: inf"),
    (dict(hyperparameters=Hyperparameters(gamma=0)), "Invalid gamma: 0"),
])
def test_api_bad_names_and_numbers_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_plan("mlp", device="cpu", **kwargs)


def test_api_factory_breaking_the_contract_raises_value_error():
    with pytest.raises(ValueError, match="unexpected keyword argument 'depth'"):
        compare(no_double_backward_factory, device="cpu", model_options=dict(depth=3),
                methods="sgd", warmup=0, repeat=1, progress=False)
