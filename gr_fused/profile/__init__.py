"""Profile finite-difference GR against double backpropagation, SAM and plain SGD.

``python -m gr_fused.profile --help`` for the command line; from Python::

    from gr_fused.profile import compare, format_table
    report = compare("resnet18", device="cuda", dtype="bf16-autocast", batch_size=128)
    print(format_table(report))

``compare`` returns a dict (the JSON schema: ``device``, ``model``, ``results`` with one
entry per (method, backend): ``method``, ``backend``, ``step_time_ms``,
``peak_memory_bytes``, ``flops`` and more). See docs/profile.md.
"""
from .methods import ANALYTIC_FORWARD_MULTIPLE, GR_METHODS, METHODS, Hyperparameters, make_step
from .models import BUILTIN_MODELS
from .report import format_table, write_csv, write_json, write_plot
from .runner import DTYPES, compare, make_plan, run_plan

__all__ = ["compare", "make_plan", "run_plan", "format_table", "write_json", "write_csv",
           "write_plot", "make_step", "Hyperparameters", "METHODS", "GR_METHODS",
           "ANALYTIC_FORWARD_MULTIPLE", "BUILTIN_MODELS", "DTYPES"]
