"""What the benchmark scripts share: the bytes each phase must move, the size parser, the
tensor sizes of a benchmark, the per-parameter SAM pattern they time against, and how results
are written. Imports no Triton, so the CPU and CUDA scripts run without it."""
from __future__ import annotations

import json
import os
from typing import List, Optional

import torch

# Elements of the storage dtype each phase must read and write per parameter element.
PHASE_BYTES = {
    "copy":         (1, 1),  # dst ← src, the reference bandwidth
    "norm":         (1, 0),  # Σ g²: read g (norm(g1) and norm(G) each)
    "perturb":      (2, 3),  # read θ, g; write backup, θ, fold·g
    "reflect":      (3, 2),  # read backup, θ, G; write θ, −G   (central difference only)
    "restore":      (1, 1),  # read backup; write θ   (a perturbed pass raised)
    "update-sgd":   (3, 2),  # read backup, G, buf; write θ, buf   (SGD with momentum)
    "update-adamw": (4, 3),  # read backup, G, m, v; write θ, m, v
    "update-none":  (2, 2),  # read backup, G; write θ, g   (GR around a torch optimizer)
    # the optimizer side of a GR + SGD-momentum step: norm + perturb + norm + update-sgd
    "gr-step":      (7, 5),  # fp32: 28 B read + 20 B written = 48 B per parameter
}


def write_results(path: str, results: dict, markdown: Optional[str] = None) -> None:
    """``results`` as JSON at ``path`` (folders made as needed) and, when given, ``markdown``
    in a .md file beside it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    if markdown is not None:
        with open(os.path.splitext(path)[0] + ".md", "w") as f:
            f.write(markdown)


def parse_size(text: str) -> int:
    text = text.upper()
    scale = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(text[-1], 1)
    return int(float(text.rstrip("KMG")) * scale)


def split(n: int, n_tensors: int) -> List[int]:
    """n elements as n_tensors sizes of a few different shapes (not multiples of a block)."""
    n_tensors = max(1, min(n_tensors, n))
    base = max(n // n_tensors, 1)
    sizes = [base + (i % 7) * 13 for i in range(n_tensors)]
    sizes[-1] += n - sum(sizes)
    if sizes[-1] <= 0:
        sizes = [base] * (n_tensors - 1) + [n - base * (n_tensors - 1)]
    return sizes


class SAMPattern:
    """The optimizer side of the popular per-parameter SAM implementation: first_step clones
    θ per tensor and adds ρ·g/‖g‖ in a Python loop; second_step puts θ back and steps
    torch.optim.SGD (with its default foreach implementation)."""

    def __init__(self, params, rho=0.05, **sgd):
        self.params, self.rho = params, rho
        self.base = torch.optim.SGD(params, **sgd)

    @torch.no_grad()
    def first_step(self):
        grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in self.params]), p=2)
        scale = self.rho / (grad_norm + 1e-12)
        self.old = []
        for p in self.params:
            self.old.append(p.data.clone())
            p.add_(p.grad * scale.to(p))

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for p, old in zip(self.params, self.old):
            p.data = old
        self.base.step()
