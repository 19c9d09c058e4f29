"""Mixed-precision GR training, with the other single-device training features.

* fp16 autocast with ``gr_fused.amp.GradScaler``: the closure scales the loss, so both
  backward passes are scaled; the optimizer unscales each gradient once inside the step; a
  step where either gradient overflows is skipped (θ restored exactly) and ``update()``
  backs the scale off.
* bf16 autocast needs no scaler (``--dtype bf16``); ``--dtype fp32`` turns autocast off.
* gradient accumulation: the closure runs every micro-batch (``--micro``), each backward
  accumulating, for both gradients.
* clipping of the combined gradient by global norm: ``max_grad_norm`` (``--clip``).
* ``--compile``: the model is compiled with torch.compile; the optimizer is unchanged.
* a checkpoint (model + optimizer + scaler + scheduler) taken halfway; with
  ``--check-resume`` the second half is replayed from it and must match bit for bit.

    python examples/train_amp.py --dtype fp16 --steps 200
    python examples/train_amp.py --dtype bf16 --micro 4 --clip 1.0 --compile --check-resume
"""
from __future__ import annotations

import argparse
import io

import torch
import torch.nn.functional as F

import gr_fused
from gr_fused.amp import GradScaler

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}


def make_model():
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.BatchNorm1d(64),
                               torch.nn.ReLU(), torch.nn.Linear(64, 10))


def make_data(steps, batch, device, seed=0):
    """A synthetic 10-class problem labelled by a fixed random teacher network."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(32, 10, generator=g)
    xs = torch.randn(steps, batch, 32, generator=g)
    return [(x.to(device), (x @ teacher).argmax(1).to(device)) for x in xs]


def build(args, device):
    model = make_model().to(device)
    opt = gr_fused.GRSGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4,
                         gamma=args.gamma, rho=args.rho, max_grad_norm=args.clip)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    scaler = GradScaler(device, enabled=args.dtype == "fp16")
    return model, opt, sched, scaler


def train(model, opt, sched, scaler, data, args, device, log=True, first=0):
    forward = torch.compile(model) if args.compile else model
    amp_dtype = DTYPES[args.dtype]
    losses = []
    for x, y in data:
        def closure():
            opt.zero_grad()
            total = torch.zeros((), device=device)
            for xm, ym in zip(x.chunk(args.micro), y.chunk(args.micro)):
                with torch.autocast(device, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss = F.cross_entropy(forward(xm), ym) / args.micro
                scaler.scale(loss).backward()  # every backward of both passes is scaled
                total += loss.detach()
            return total

        loss = scaler.step(opt, closure)  # the loss at θ; calls the closure twice
        scaler.update()
        sched.step()
        losses.append(float(loss))
        step = first + len(losses)  # counts on across the halves
        if log and step % max(1, args.steps // 10) == 0:
            skipped = int(opt.skipped_steps) if opt.skipped_steps is not None else 0
            print(f"step {step:4d}  loss {losses[-1]:.4f}  scale {scaler.get_scale():g}"
                  f"  skipped {skipped}")
    return losses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--micro", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--gamma", type=float, default=0.05)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--clip", type=float, default=None, help="max_grad_norm")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--check-resume", action="store_true")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    data = make_data(args.steps, args.batch, device)
    half = args.steps // 2

    model, opt, sched, scaler = build(args, device)
    losses = train(model, opt, sched, scaler, data[:half], args, device)
    ckpt = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict(), "scaler": scaler.state_dict()}, ckpt)
    losses += train(model, opt, sched, scaler, data[half:], args, device, first=half)
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")

    if args.check_resume:
        ckpt.seek(0)
        state = torch.load(ckpt)
        model2, opt2, sched2, scaler2 = build(args, device)
        model2.load_state_dict(state["model"])
        opt2.load_state_dict(state["opt"])
        sched2.load_state_dict(state["sched"])
        scaler2.load_state_dict(state["scaler"])
        train(model2, opt2, sched2, scaler2, data[half:], args, device, log=False)
        same = all(torch.equal(a, b) for a, b in zip(model2.state_dict().values(),
                                                      model.state_dict().values()))
        print("resumed from the halfway checkpoint:", "bit for bit" if same else "MISMATCH")
        if not same:
            raise SystemExit(1)
    return losses


if __name__ == "__main__":
    main()
