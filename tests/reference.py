"""An independent float64 reference of the method (docs/design.md §1), written from the
math (not from gr_fused).

Everything is out of place and explicit: θ is a list of tensors per param group, the loss is
a function of all of them, and each formula reads like docs/design.md.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List

import torch

Groups = List[List[torch.Tensor]]


def grad_at(loss_fn: Callable[[Groups], torch.Tensor], theta: Groups) -> Groups:
    leaves = [[t.detach().clone().requires_grad_() for t in g] for g in theta]
    flat = [t for g in leaves for t in g]
    grads = torch.autograd.grad(loss_fn(leaves), flat, allow_unused=True)
    out, i = [], 0
    for g in leaves:
        out.append([torch.zeros_like(t) if grads[i + k] is None else grads[i + k]
                    for k, t in enumerate(g)])
        i += len(g)
    return out


def global_norm(groups: Groups) -> float:
    return math.sqrt(sum(float((t * t).sum()) for g in groups for t in g))


def gr_gradient(loss_fn, theta: Groups, hp: List[Dict], clip: bool = True) -> Groups:
    """The combined gradient g of one FD-GR step (docs/design.md §1), per group
    hyperparameters ``gamma, rho, normalize, difference, alpha, adaptive, max_grad_norm``."""
    g1 = grad_at(loss_fn, theta)
    weight = [[(t * t if h["adaptive"] else torch.ones_like(t)) for t in g]
              for g, h in zip(theta, hp)]
    norm_vec = [[(t.abs() if h["adaptive"] else torch.ones_like(t)) * gg
                 for t, gg in zip(g, grads)] for g, grads, h in zip(theta, g1, hp)]
    norm = global_norm(norm_vec)
    eps = [h["rho"] / (norm + 1e-12) if h["normalize"] else h["rho"] for h in hp]
    alpha = [h["alpha"] if h["alpha"] is not None else h["gamma"] / e for h, e in zip(hp, eps)]

    def shifted(sign):
        return [[t + sign * e * w * gg for t, w, gg in zip(g, ws, grads)]
                for g, ws, grads, e in zip(theta, weight, g1, eps)]

    g_plus = grad_at(loss_fn, shifted(+1))
    combined = []
    if any(h["difference"] == "central" for h in hp):
        g_minus = grad_at(loss_fn, shifted(-1))
        for k, h in enumerate(hp):
            # g = g1 + γ·(g⁺ − g⁻)/(2ε), with γ = α·ε
            combined.append([a + alpha[k] * (p - m) / 2 for a, p, m in zip(g1[k], g_plus[k], g_minus[k])])
    else:
        for k in range(len(hp)):
            combined.append([(1 - alpha[k]) * a + alpha[k] * b for a, b in zip(g1[k], g_plus[k])])
    return clip_groups(combined, hp) if clip else combined


def clip_groups(combined: Groups, hp: List[Dict]) -> Groups:
    """clip_grad_norm_ over every group, each with its own threshold (or none)."""
    combined = [list(g) for g in combined]
    total = global_norm(combined)
    for k, h in enumerate(hp):
        if h["max_grad_norm"] is not None:
            coef = min(1.0, h["max_grad_norm"] / (total + 1e-6))
            combined[k] = [t * coef for t in combined[k]]
    return combined


def sgd_update(theta, grads, state, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
               nesterov=False):
    """torch.optim.SGD's documented update, out of place."""
    new = []
    for i, (t, g) in enumerate(zip(theta, grads)):
        if weight_decay:
            g = g + weight_decay * t
        if momentum:
            buf = state.get(i)
            buf = g.clone() if buf is None else momentum * buf + (1 - dampening) * g
            state[i] = buf
            g = g + momentum * buf if nesterov else buf
        new.append(t - lr * g)
    return new


def adamw_update(theta, grads, state, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
    """torch.optim.AdamW's documented update, out of place."""
    b1, b2 = betas
    new = []
    for i, (t, g) in enumerate(zip(theta, grads)):
        step, m, v = state.get(i, (0, torch.zeros_like(t), torch.zeros_like(t)))
        step += 1
        t = t * (1 - lr * weight_decay)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** step)
        v_hat = v / (1 - b2 ** step)
        state[i] = (step, m, v)
        new.append(t - lr * m_hat / (v_hat.sqrt() + eps))
    return new


def run_reference(loss_fn, theta: Groups, hp: List[Dict], steps: int,
                  update: str = "sgd", interval: int = 1) -> Groups:
    """``steps`` GR steps; ``hp[k]`` holds group k's GR and base hyperparameters.

    ``interval`` = k > 1: every k-th step (the first included) is the full FD step and also
    caches v̂, the unit vector along the component of its combined gradient g orthogonal to
    g1 (over all groups); the steps in between take g = g1 + reuse_scale·‖g1‖·v̂ (then
    clipping as any step)."""
    theta = [[t.detach().double().clone() for t in g] for g in theta]
    states = [dict() for _ in theta]
    direction = None
    for t in range(steps):
        if interval == 1:
            grads = gr_gradient(loss_fn, theta, hp)
        elif t % interval == 0:
            g1 = grad_at(loss_fn, theta)
            g = gr_gradient(loss_fn, theta, hp, clip=False)
            beta = sum(float((a * b).sum()) for ga, gb in zip(g, g1) for a, b in zip(ga, gb)) \
                / global_norm(g1) ** 2
            v = [[a - beta * b for a, b in zip(ga, gb)] for ga, gb in zip(g, g1)]
            norm_v = global_norm(v)
            direction = [[x / norm_v for x in gv] for gv in v]
            grads = clip_groups(g, hp)
        else:
            g1 = grad_at(loss_fn, theta)
            n1 = global_norm(g1)
            grads = clip_groups([[a + h.get("reuse_scale", 0.7) * n1 * d for a, d in zip(ga, gd)]
                                 for ga, gd, h in zip(g1, direction, hp)], hp)
        for k, h in enumerate(hp):
            if update == "sgd":
                theta[k] = sgd_update(theta[k], grads[k], states[k], h["lr"], h.get("momentum", 0.0),
                                      h.get("dampening", 0.0), h.get("weight_decay", 0.0),
                                      h.get("nesterov", False))
            else:
                theta[k] = adamw_update(theta[k], grads[k], states[k], h["lr"],
                                        h.get("betas", (0.9, 0.999)), h.get("eps", 1e-8),
                                        h.get("weight_decay", 1e-2))
    return theta


def sam_reference(loss_fn, theta: Groups, rho: float, lr: float, momentum: float, steps: int,
                  adaptive: bool = False) -> Groups:
    """The popular per-parameter SAM algorithm (Foret et al.; ASAM when adaptive): ascend to
    θ + ρ·T²g/‖T g‖ (T = |θ| if adaptive else 1), take the gradient there, step SGD from θ."""
    theta = [[t.detach().double().clone() for t in g] for g in theta]
    state = [dict() for _ in theta]
    for _ in range(steps):
        g = grad_at(loss_fn, theta)
        scale = [[t.abs() if adaptive else torch.ones_like(t) for t in grp] for grp in theta]
        norm = global_norm([[s * x for s, x in zip(sg, gg)] for sg, gg in zip(scale, g)])
        e = [[s * s * x * rho / (norm + 1e-12) for s, x in zip(sg, gg)] for sg, gg in zip(scale, g)]
        g2 = grad_at(loss_fn, [[t + d for t, d in zip(tg, eg)] for tg, eg in zip(theta, e)])
        theta = [sgd_update(tg, gg, st, lr, momentum) for tg, gg, st in zip(theta, g2, state)]
    return theta
