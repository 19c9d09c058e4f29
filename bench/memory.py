"""Persistent extra memory of each optimizer mode over its base torch optimizer.

It counts the bytes of every distinct storage the optimizer keeps alive between steps
(its ``state`` and its backend scratch), leaving out the storages of the parameters and
gradients themselves (the base optimizer has those too), after a few real steps on a model.
Run: ``python bench/memory.py`` (prints a markdown table; ``--json PATH`` to save it).
"""
from __future__ import annotations

import argparse
import json

import torch

import gr_fused


def _tensors(obj, seen=None):
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, seen)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("gr_fused.backends"):
        yield from _tensors(vars(obj), seen)


def held_bytes(opt, model) -> int:
    owned = {p.untyped_storage().data_ptr() for p in model.parameters()}
    owned |= {p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.grad is not None}
    sources = [opt.state, getattr(opt, "_bucket_extra", {})]
    if hasattr(opt, "base_optimizer"):
        sources.append(opt.base_optimizer.state)
    storages = {}
    for src in sources:
        for t in _tensors(src):
            s = t.untyped_storage()
            if s.data_ptr() not in owned:
                storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def measure(make_opt, steps=3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    opt = make_opt(model.parameters())

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        if isinstance(opt, gr_fused.SAM):
            closure()  # SAM.step takes the gradients already computed, as the popular SAM
        opt.step(closure)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return held_bytes(opt, model), param_bytes


MODES = {
    # name: (ours, base)
    "GRSGD (momentum), forward/backward": (
        lambda p, b: gr_fused.GRSGD(p, lr=0.1, momentum=0.9, gamma=0.05, backend=b),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
    "GRSGD (momentum), central": (
        lambda p, b: gr_fused.GRSGD(p, lr=0.1, momentum=0.9, gamma=0.05, difference="central", backend=b),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
    "GRAdamW": (
        lambda p, b: gr_fused.GRAdamW(p, lr=1e-3, gamma=0.05, backend=b),
        lambda p: torch.optim.AdamW(p, lr=1e-3)),
    "GR(torch.optim.Adam)": (
        lambda p, b: gr_fused.GR(p, torch.optim.Adam, gamma=0.05, lr=1e-3, backend=b),
        lambda p: torch.optim.Adam(p, lr=1e-3)),
    "SAM(torch.optim.SGD)": (
        lambda p, b: gr_fused.SAM(p, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, backend=b),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
    "GRSGD, gamma=0": (
        lambda p, b: gr_fused.GRSGD(p, lr=0.1, momentum=0.9, gamma=0.0, backend=b),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="*", default=None)
    parser.add_argument("--json")
    args = parser.parse_args()
    names = args.backends or [n for n in gr_fused.backends.names()
                              if n != "auto" and gr_fused.backends.unavailable_reason(n, "cpu") is None]
    rows = []
    for mode, (ours, base) in MODES.items():
        base_bytes, param_bytes = measure(base)
        for backend in names:
            our_bytes, _ = measure(lambda p: ours(p, backend))
            rows.append(dict(mode=mode, backend=backend, param_bytes=param_bytes,
                             extra_bytes=our_bytes - base_bytes,
                             extra_x_params=(our_bytes - base_bytes) / param_bytes))
    print("| mode | backend | extra persistent memory over the base optimizer |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['backend']} | {r['extra_x_params']:.2f}x parameter bytes |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
