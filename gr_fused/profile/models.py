"""Built-in models for the profiler, on random data of the right shape (nothing downloaded).

Every model, built in or the user's own, is made by a *factory*::

    factory(batch_size: int, device: torch.device) -> (model, batch, loss_fn)

* ``model``: a ``torch.nn.Module``; every parameter with ``requires_grad`` is trained.
* ``batch``: what ``loss_fn`` reads: a tensor, or a tuple/list/dict of them (other values
  are passed through). The profiler moves the model and every tensor of the batch to the
  profiled device, and casts floating-point ones to the parameter dtype (``--dtype float64``
  or ``bfloat16``; under ``bf16-autocast`` they stay float32).
* ``loss_fn(model, batch)``: runs the forward pass and returns the loss, a 0-dim tensor.

The same batch is used at every step, so a method that trains lowers its loss.
The built-in factories take their size as keyword arguments (``BUILTIN_MODELS[name].full``
lists them); on CPU the large models default to a reduced size (``.cpu``).
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

Factory = Callable[..., Tuple[nn.Module, Any, Callable[[nn.Module, Any], torch.Tensor]]]

IMAGE_SIZE = 32  # CIFAR
NUM_CLASSES = 10


def classification_loss(model: nn.Module, batch) -> torch.Tensor:
    inputs, targets = batch
    return F.cross_entropy(model(inputs), targets)


def next_token_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def _image_batch(batch_size: int):
    return (torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE),
            torch.randint(0, NUM_CLASSES, (batch_size,)))


# --------------------------------------------------------------------------- mlp
def mlp(batch_size: int, device, *, width: int = 512, depth: int = 4, in_features: int = 784):
    """``depth`` Linear layers (in_features → width → … → width → 10), ReLU between."""
    _check_positive(width=width, depth=depth, in_features=in_features)
    sizes = [in_features] + [width] * (depth - 1) + [NUM_CLASSES]
    layers = []
    with torch.device(device):
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            if i:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(n_in, n_out))
    batch = (torch.randn(batch_size, in_features), torch.randint(0, NUM_CLASSES, (batch_size,)))
    return nn.Sequential(*layers), batch, classification_loss


# --------------------------------------------------------------------------- cnn
def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU())


def cnn(batch_size: int, device, *, width: int = 32):
    """Three 3x3 conv + BatchNorm + ReLU layers (width, 2·width, 4·width channels; the last
    two with stride 2), global average pooling and a Linear classifier; 32x32 input."""
    _check_positive(width=width)
    with torch.device(device):
        model = nn.Sequential(_conv_bn_relu(3, width, 1), _conv_bn_relu(width, 2 * width, 2),
                              _conv_bn_relu(2 * width, 4 * width, 2), nn.AdaptiveAvgPool2d(1),
                              nn.Flatten(), nn.Linear(4 * width, NUM_CLASSES))
    return model, _image_batch(batch_size), classification_loss


# --------------------------------------------------------------------------- resnet18
class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def resnet18(batch_size: int, device, *, width: int = 64):
    """ResNet-18 for CIFAR (3x3 stem, no max-pool, 32x32 input); stages of width, 2·, 4· and
    8·width channels (width 64 is the standard model, 11.2M parameters)."""
    _check_positive(width=width)
    with torch.device(device):
        layers = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        c_in = width
        for stage, stride in enumerate((1, 2, 2, 2)):
            c_out = width * 2 ** stage
            layers += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, NUM_CLASSES)]
        model = nn.Sequential(*layers)
    return model, _image_batch(batch_size), classification_loss


# --------------------------------------------------------------------------- wide resnet
class WideBlock(nn.Module):
    """Pre-activation block of Zagoruyko & Komodakis (2016): BN-ReLU-conv, BN-ReLU-conv."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


def wide_resnet(batch_size: int, device, *, depth: int = 28, width: int = 10):
    """WRN-depth-width for CIFAR: (depth − 4)/6 blocks in each of 3 stages of 16·width,
    32·width, 64·width channels (WRN-28-10 has 36.5M parameters)."""
    _check_wide_resnet(depth=depth, width=width)
    blocks_per_stage = (depth - 4) // 6
    with torch.device(device):
        layers = [nn.Conv2d(3, 16, 3, 1, 1, bias=False)]
        c_in = 16
        for stage, stride in enumerate((1, 2, 2)):
            c_out = 16 * width * 2 ** stage
            for i in range(blocks_per_stage):
                layers.append(WideBlock(c_in, c_out, stride if i == 0 else 1))
                c_in = c_out
        layers += [nn.BatchNorm2d(c_in), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                   nn.Linear(c_in, NUM_CLASSES)]
        model = nn.Sequential(*layers)
    return model, _image_batch(batch_size), classification_loss


# --------------------------------------------------------------------------- gpt
class CausalSelfAttention(nn.Module):
    """Multi-head causal attention written with matmul + softmax, so that double
    backpropagation (db-gr) runs through it (fused attention kernels have no double
    backward) and every method profiles the same model."""

    def __init__(self, n_embd: int, n_head: int, seq_len: int):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        mask = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, x):
        batch, seq, n_embd = x.shape
        q, k, v = self.qkv(x).split(n_embd, dim=2)
        q, k, v = (t.view(batch, seq, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~self.causal_mask[:seq, :seq], float("-inf"))
        out = scores.softmax(dim=-1).to(v.dtype) @ v
        return self.proj(out.transpose(1, 2).reshape(batch, seq, n_embd))


class TransformerBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int, seq_len: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, seq_len)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A GPT-2-style decoder: token + learned position embeddings, pre-LayerNorm blocks,
    a final LayerNorm and an output layer tied to the token embedding."""

    def __init__(self, n_layer: int, n_embd: int, n_head: int, seq_len: int, vocab: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, n_embd)
        self.position_embedding = nn.Embedding(seq_len, n_embd)
        self.blocks = nn.ModuleList(TransformerBlock(n_embd, n_head, seq_len)
                                    for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.token_embedding.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def gpt(batch_size: int, device, *, n_layer: int = 12, n_embd: int = 768, n_head: int = 12,
        seq_len: int = 512, vocab: int = 50257):
    """GPT-2 small by default (124M parameters); the batch is random token ids."""
    _check_gpt(n_layer=n_layer, n_embd=n_embd, n_head=n_head, seq_len=seq_len, vocab=vocab)
    with torch.device(device):
        model = GPT(n_layer, n_embd, n_head, seq_len, vocab)
    tokens = torch.randint(0, vocab, (batch_size, seq_len + 1))
    return model, tokens, next_token_loss


def _check_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"Invalid {name}: {value!r} (an integer >= 1)")


def _check_wide_resnet(**sizes: int) -> None:
    _check_positive(**sizes)
    depth = sizes.get("depth", 28)
    if (depth - 4) % 6 or depth < 10:
        raise ValueError(f"Invalid depth: {depth} (wide resnets need depth = 6n + 4, n >= 1)")


def _check_gpt(**sizes: int) -> None:
    _check_positive(**sizes)
    n_embd, n_head = sizes.get("n_embd", 768), sizes.get("n_head", 12)
    if n_embd % n_head:
        raise ValueError(f"Invalid n_head: {n_head} (must divide n_embd={n_embd})")


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class BuiltinModel:
    factory: Factory
    full: Dict[str, int]          # size options of the full model, passed to the factory
    batch_size: int               # default batch at full size
    cpu: Dict[str, int] = field(default_factory=dict)  # CPU defaults that differ from full
    cpu_batch_size: int = 0       # CPU default batch (0: same as batch_size)
    # check(**size options): ValueError, naming the option, for sizes the factory refuses
    check: Optional[Callable[..., None]] = None

    def check_options(self, options: Dict[str, Any]) -> None:
        """ValueError for size options the factory would refuse (before anything is built)."""
        (self.check or _check_positive)(**options)


BUILTIN_MODELS: Dict[str, BuiltinModel] = {
    "mlp": BuiltinModel(mlp, dict(width=512, depth=4, in_features=784), batch_size=128),
    "cnn": BuiltinModel(cnn, dict(width=32), batch_size=64, cpu_batch_size=32),
    "resnet18": BuiltinModel(resnet18, dict(width=64), batch_size=128,
                             cpu=dict(width=16), cpu_batch_size=16),
    "wrn28-10": BuiltinModel(wide_resnet, dict(depth=28, width=10), batch_size=128,
                             cpu=dict(depth=10, width=2), cpu_batch_size=16,
                             check=_check_wide_resnet),
    "gpt": BuiltinModel(gpt, dict(n_layer=12, n_embd=768, n_head=12, seq_len=512, vocab=50257),
                        batch_size=8, cpu=dict(n_layer=2, n_embd=128, n_head=4, seq_len=64,
                                               vocab=1024), cpu_batch_size=4, check=_check_gpt),
}


def load_user_factory(spec: str) -> Factory:
    """The factory named by ``"package.module:function"``."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"Invalid model: {spec!r} (a built-in name: {', '.join(BUILTIN_MODELS)};"
                         " or 'package.module:factory')")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"Invalid model: {spec!r}: cannot import {module_name!r} ({exc})") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"Invalid model: {spec!r}: {module_name!r} has no callable {attr!r}")
    return factory

