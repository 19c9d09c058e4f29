"""The profiler's report as a terminal table, JSON, CSV and a PNG bar chart."""
from __future__ import annotations

import csv
import json
import math
from typing import Any, Dict, List, Optional

from .methods import BASELINE_BACKEND

Report = Dict[str, Any]

MIB = 2 ** 20
# Report fields copied into every CSV row, before the per-method fields.
CSV_CONTEXT = ("device", "device_name", "model", "dtype", "batch_size", "torch_version")
CSV_RESULT = ("method", "backend", "step_time_ms", "step_time_ms_min", "step_time_ms_max",
              "ratio_to_sgd", "ratio_to_db_gr", "peak_memory_bytes", "flops",
              "flops_per_forward", "analytic_flops_per_forward", "analytic_flops",
              "loss_first", "loss_last", "skipped_steps")


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(report: Report) -> str:
    """The report as a table, with what was measured and how, for the terminal."""
    options = ", ".join(f"{k}={v}" for k, v in report["model_options"].items())
    lines = [
        f"model {report['model']}" + (f" ({options})" if options else "")
        + f", {report['parameters'] / 1e6:.2f}M parameters, batch {report['batch_size']}, "
        f"{report['dtype']}",
        f"device {report['device']} ({report['device_name']}), torch {report['torch_version']}"
        f", gr_fused {report['gr_fused_version']}",
    ]
    if report["size_note"]:
        lines.append(f"size: {report['size_note']}")
    header = ("method", "backend", "step ms", "x sgd", "x db-gr", "peak MiB", "GFLOP/step",
              "FLOPs/fwd", "paper/fwd", "loss first→last")
    rows = [header]
    for r in report["results"]:
        rows.append((r["method"], r["backend"], f"{r['step_time_ms']:.2f}",
                     _ratio(r["ratio_to_sgd"]), _ratio(r["ratio_to_db_gr"]),
                     f"{r['peak_memory_bytes'] / MIB:.1f}", f"{r['flops'] / 1e9:.3f}",
                     _ratio(r["flops_per_forward"]), str(r["analytic_flops_per_forward"]),
                     f"{r['loss_first']:.4f}→{r['loss_last']:.4f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for n, row in enumerate(rows):
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += [
        f"step ms: median of {report['repeat']} steps after {report['warmup']} warm-up steps; "
        f"{report['timer']}.",
        f"peak MiB: {report['memory_measure']}.",
        f"GFLOP/step: {report['flop_counter']}. FLOPs/fwd: the same as a multiple of one forward"
        f" pass ({report['forward_flops'] / 1e9:.3f} GFLOP); paper/fwd: the analytic count of "
        "the paper's Section 3.2 (3L products per gradient, FD 6L, central and DB 9L).",
    ]
    for name, why in report["skipped_backends"].items():
        lines.append(f"backend {name} not run: {why}")
    for r in report.get("not_runnable", ()):
        lines.append(f"{r['method']} ({r['backend']}) not run: {r['reason']}")
    lines += [f"WARNING: {r['method']} ({r['backend']}) skipped {r['skipped_steps']} steps on "
              "inf/NaN; its time is not that of a full step" for r in report["results"]
              if r["skipped_steps"]]
    lines += summary(report)
    return "\n".join(lines)


def headline_ratios(report: Report, fd_backends: Optional[List[str]] = None
                    ) -> Optional[Dict[str, Any]]:
    """The fastest fd-gr (among ``fd_backends``, default all) against sgd and sam-ref, and
    db-gr against it: ``{"fd_backend", "fd_over_sgd", "fd_over_sam_ref", "db_over_fd"}``
    (a ratio is None when its method was not run), or None without such an fd-gr."""
    fastest: Dict[str, Dict[str, Any]] = {}
    for r in report["results"]:
        if r["method"] == "fd-gr" and fd_backends is not None and r["backend"] not in fd_backends:
            continue
        best = fastest.get(r["method"])
        if best is None or r["step_time_ms"] < best["step_time_ms"]:
            fastest[r["method"]] = r
    fd = fastest.get("fd-gr")
    if fd is None:
        return None

    def over(a: str, b: str) -> Optional[float]:
        if a in fastest and b in fastest:
            return fastest[a]["step_time_ms"] / fastest[b]["step_time_ms"]
        return None

    return {"fd_backend": fd["backend"], "fd_over_sgd": over("fd-gr", "sgd"),
            "fd_over_sam_ref": over("fd-gr", "sam-ref"), "db_over_fd": over("db-gr", "fd-gr")}


def summary(report: Report) -> List[str]:
    """The headline ratios as one line (see :func:`headline_ratios`)."""
    h = headline_ratios(report)
    if h is None:
        return []
    ratios = [f"{h[key]:.2f}x {name}" for key, name in (("fd_over_sgd", "sgd"),
                                                         ("fd_over_sam_ref", "sam-ref"))
              if h[key] is not None]
    parts = [f"fd-gr ({h['fd_backend']}) step = " + ", ".join(ratios)] if ratios else []
    if h["db_over_fd"] is not None:
        parts.append(f"db-gr step = {h['db_over_fd']:.2f}x fd-gr ({h['fd_backend']})")
    return ["summary: " + "; ".join(parts)] if parts else []


def _strict_json(value: Any) -> Any:
    """``value`` with every non-finite float (a diverged loss: inf, NaN) as None, which JSON
    writes as null (NaN and Infinity are not JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


def write_json(report: Report, path: str) -> None:
    """The report as JSON; non-finite numbers (a diverged loss) are written as null."""
    text = json.dumps(_strict_json(report), indent=2, allow_nan=False)
    with open(path, "w") as f:
        f.write(text + "\n")


def write_csv(report: Report, path: str) -> None:
    """One row per profiled (method, backend), with the run's context in every row."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_CONTEXT + CSV_RESULT)
        writer.writeheader()
        for r in report["results"]:
            row = {k: report[k] for k in CSV_CONTEXT}
            row.update({k: r[k] for k in CSV_RESULT})
            writer.writerow(row)


def write_plot(report: Report, path: str) -> None:
    """A PNG with two bar charts: median step time, with the spread of the timed steps
    (min to max) as error bars, labelled with the ratio to sgd; and peak memory, one bar per
    (method, backend)."""
    import matplotlib.pyplot as plt

    fig = plot_figure(report)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_labels(results: List[Dict[str, Any]]) -> List[str]:
    """One x label per (method, backend) row of the plot: the method, with its backend
    whenever it runs on a gr_fused backend or appears more than once."""
    counts: Dict[str, int] = {}
    for r in results:
        counts[r["method"]] = counts.get(r["method"], 0) + 1
    return [f"{r['method']}\n({r['backend']})"
            if counts[r["method"]] > 1 or r["backend"] != BASELINE_BACKEND else r["method"]
            for r in results]


def plot_figure(report: Report):
    """The figure of :func:`write_plot` (matplotlib, Agg backend)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib (pip install matplotlib)") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    labels = plot_labels(results)
    x = list(range(len(results)))  # one position per row, whatever the labels
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(results)), 4.5))
    medians = [r["step_time_ms"] for r in results]
    spread = [[m - r["step_time_ms_min"] for m, r in zip(medians, results)],
              [r["step_time_ms_max"] - m for m, r in zip(medians, results)]]
    bars = ax_time.bar(x, medians, color="tab:blue", yerr=spread, capsize=3,
                       error_kw=dict(ecolor="0.3", elinewidth=1))
    ax_time.bar_label(bars, [f"{_ratio(r['ratio_to_sgd'])}x" if r["ratio_to_sgd"] else ""
                             for r in results], fontsize=8, padding=2)
    ax_time.set_ylabel("step time (ms): median, bars min to max")
    ax_time.set_title("step time (label: x sgd)")
    ax_mem.bar(x, [r["peak_memory_bytes"] / MIB for r in results], color="tab:orange")
    ax_mem.set_ylabel("peak memory (MiB)")
    ax_mem.set_title("peak memory")
    for ax in (ax_time, ax_mem):
        ax.set_xticks(x, labels)
        ax.tick_params(axis="x", labelsize=8, rotation=45)
    fig.suptitle(f"{report['model']}, batch {report['batch_size']}, {report['dtype']}, "
                 f"{report['device']} ({report['device_name']})", fontsize=10)
    fig.tight_layout()
    return fig
