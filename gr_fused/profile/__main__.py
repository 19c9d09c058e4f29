"""``python -m gr_fused.profile``: time, memory and FLOPs of FD-GR vs DB-GR, SAM and SGD."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .methods import METHODS, Hyperparameters
from .models import BUILTIN_MODELS
from .report import format_table, write_csv, write_json, write_plot
from .runner import DEFAULT_MODEL, DTYPES, ModelError, make_plan, run_plan

# CLI flag -> factory keyword (passed to the built-in models, or to a user factory as is)
SIZE_OPTIONS = {
    "width": "mlp: hidden units; cnn, resnet18: base channels; wrn28-10: widen factor",
    "depth": "mlp: Linear layers; wrn28-10: depth (6n+4)",
    "n_layer": "gpt: transformer blocks", "n_embd": "gpt: embedding size",
    "n_head": "gpt: attention heads", "seq_len": "gpt: sequence length",
    "vocab": "gpt: vocabulary size",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gr_fused.profile",
        description="Profile one training step of plain SGD, finite-difference GR (forward, "
                    "backward, central; on every gr_fused backend that can run), exact GR by "
                    "double backpropagation and the usual per-parameter SAM: median step time, "
                    "ratios, peak memory and matmul/conv FLOPs.",
        epilog="A user model: --model package.module:factory, where factory(batch_size, device,"
               " **size options given) returns (model, batch, loss_fn) and loss_fn(model, batch)"
               " returns the scalar loss. See docs/profile.md.")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"built-in: {', '.join(BUILTIN_MODELS)}; or package.module:factory "
                             f"(default {DEFAULT_MODEL})")
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available)")
    parser.add_argument("--dtype", default="float32",
                        help=f"{', '.join(DTYPES)} (default float32; bf16-autocast keeps "
                             "float32 parameters and runs the forward under torch.autocast)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--methods", help=f"comma-separated, from {','.join(METHODS)} "
                                          "(default all)")
    parser.add_argument("--backend", default="all",
                        help="comma-separated gr_fused backends for fd-gr, fd-gr-kN, bd-gr, "
                             "central-gr and sam (default all that can run)")
    parser.add_argument("--warmup", type=int, help="untimed steps (default 2 on CPU, 5 on CUDA)")
    parser.add_argument("--repeat", type=int, help="timed steps (default 10 on CPU, 20 on CUDA)")
    defaults = Hyperparameters()
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--momentum", type=float, default=defaults.momentum)
    parser.add_argument("--gamma", type=float, default=defaults.gamma, help="GR strength")
    parser.add_argument("--rho", type=float, default=defaults.rho,
                        help="ascent radius (bd-gr uses -rho)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sequential", action="store_true",
                        help="run the methods one after another, holding one model at a time "
                             "(default: interleave their timed steps, holding all models)")
    sizes = parser.add_argument_group("model size (defaults: the full model; reduced on CPU)")
    for name, text in SIZE_OPTIONS.items():
        sizes.add_argument("--" + name.replace("_", "-"), dest=name, type=int, help=text)
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON")
    parser.add_argument("--csv", metavar="PATH", help="write one row per method as CSV")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG bar chart")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, path in (("--json", args.json), ("--csv", args.csv), ("--plot", args.plot)):
        if path and os.path.isdir(path):
            parser.error(f"{flag} {path!r} is a folder (give a file path)")
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            parser.error(f"the folder of {path!r} does not exist")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib (pip install matplotlib)")
    options = {k: getattr(args, k) for k in SIZE_OPTIONS if getattr(args, k) is not None}
    try:
        plan = make_plan(args.model, device=args.device, dtype=args.dtype,
                         batch_size=args.batch_size, methods=args.methods, backends=args.backend,
                         warmup=args.warmup, repeat=args.repeat,
                         hyperparameters=Hyperparameters(args.lr, args.momentum, args.gamma,
                                                         args.rho),
                         model_options=options, seed=args.seed, sequential=args.sequential)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        report = run_plan(plan, progress=not args.no_progress)
    except ModelError as exc:  # the factory refused its options or broke its contract
        parser.error(str(exc))
    report["command"] = "python -m gr_fused.profile " + " ".join(
        sys.argv[1:] if argv is None else argv)
    print(format_table(report))
    for path, write in ((args.json, write_json), (args.csv, write_csv), (args.plot, write_plot)):
        if path:
            write(report, path)
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
