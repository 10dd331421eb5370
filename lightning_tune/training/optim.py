"""The optimiser and learning-rate schedule of a recipe, from flat, serialisable recipe parameters.

A recipe names its optimiser by class path (`torch.optim.AdamW`, `torch.optim.SGD`,
`bitsandbytes.optim.AdamW8bit`, any `torch.optim.Optimizer` subclass) with extra keyword arguments;
`lr`, `weight_decay` and `betas` stay recipe parameters, so `--model.lr` is the one spelling of the
learning rate whatever the optimiser. Strings and dicts, not live objects, so the saved
hyper-parameters load with `torch.load(weights_only=True)` and a checkpoint rebuilds the same optimiser.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Iterable
from typing import Any, Literal

import torch

LRSchedule = Literal["cosine", "linear", "constant"]
# Recipe parameters: in optimizer_args they would be a second place for one value.
RECIPE_KEYS = ("lr", "weight_decay", "betas")


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The class a name stands for: an import path (`torch.optim.SGD`), or a bare torch.optim name (`SGD`)."""
    path = name if "." in name else f"torch.optim.{name}"
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        if module_name.split(".")[0] == "bitsandbytes":
            raise ValueError(f"optimizer: {name} needs bitsandbytes: pip install bitsandbytes (in a checkout: pip install -e '.[qlora]')") from None
        raise ValueError(f"optimizer: cannot import {module_name!r} for {name!r} ({err}); expected a class path such as torch.optim.AdamW") from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"optimizer: {path!r} is not a torch.optim.Optimizer class; e.g. torch.optim.AdamW, torch.optim.SGD, bitsandbytes.optim.AdamW8bit")
    return cls


def optimizer_kwargs(cls: type[torch.optim.Optimizer], lr: float, weight_decay: float, betas: tuple[float, float], optimizer_args: dict[str, Any] | None) -> dict[str, Any]:
    """The keyword arguments `cls` is built with: `lr`, `betas` and `weight_decay` where it takes them,
    and `optimizer_args`, each checked against its signature."""
    args = dict(optimizer_args or {})
    name = f"{cls.__module__}.{cls.__qualname__}"
    if "params" in args:
        raise ValueError("optimizer_args: 'params' is the recipe's to give (its trainable parameters)")
    clash = [key for key in RECIPE_KEYS if key in args]
    if clash:
        raise ValueError(f"optimizer_args: {clash[0]!r} is a recipe parameter; set model.{clash[0]} instead")
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        accepted = [n for n in params if n not in ("self", "params", *RECIPE_KEYS)]
        unknown = [key for key in args if key not in params]
        if unknown:
            raise ValueError(f"optimizer_args: {name} takes no argument {unknown[0]!r}; it takes {', '.join(accepted) or 'none'}")
    kwargs = {"lr": lr, **args}
    if "betas" in params:
        kwargs["betas"] = tuple(betas)
    if "weight_decay" in params:
        kwargs["weight_decay"] = weight_decay  # the decayed group's; norms and biases get 0 (param_groups)
    elif weight_decay:
        raise ValueError(f"weight_decay: {name} has no weight decay; set weight_decay: 0")
    return kwargs


# torch's own Adam family, whose single fused kernel per step (CPU and CUDA) does in one pass over
# each tensor what the default `foreach` path does in ~8 elementwise passes: measured 30 ms against
# 159 ms for the 58 M-parameter benchmark model on 2 CPU cores. That is the optimiser step of full
# fine-tuning, a fixed cost per step that packing cannot shrink. Results differ from `foreach` only
# by rounding (one ulp after a few steps), as any other order of the same fp32 operations would.
FUSABLE = (torch.optim.Adam, torch.optim.AdamW)
FUSED_DEVICES = ("cpu", "cuda")


def with_fused_default(cls: type[torch.optim.Optimizer], kwargs: dict[str, Any], params: Iterable[torch.Tensor]) -> dict[str, Any]:
    """`kwargs` with `fused=True` added for torch's Adam/AdamW on plain CPU or CUDA floating-point tensors,
    unless the user chose `fused` or `foreach` in `optimizer_args`.

    Sharded parameters (FSDP2's DTensors) keep torch's default path: the fused kernels' DTensor
    support depends on the device and torch version, and a run must not fail at its first step.
    """
    if cls not in FUSABLE or "fused" in kwargs or "foreach" in kwargs:
        return kwargs
    params = list(params)
    plain = all(type(p) is torch.nn.Parameter or type(p) is torch.Tensor for p in params)
    if params and plain and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params):
        return {**kwargs, "fused": True}
    return kwargs


def check_optimizer(cls: type[torch.optim.Optimizer], kwargs: dict[str, Any]) -> None:
    """Let the class validate its arguments now (a negative momentum, a bad eps...), on one dummy
    parameter, so a bad value fails when the recipe is built rather than after the model loads."""
    try:
        cls([torch.nn.Parameter(torch.zeros(1))], **kwargs)
    except (ValueError, TypeError, RuntimeError) as err:
        shown = {k: v for k, v in kwargs.items() if k != "lr"}
        raise ValueError(f"optimizer_args: {cls.__module__}.{cls.__qualname__} refused {shown}: {err}") from None


def param_groups(named_parameters: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float, takes_weight_decay: bool = True) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: matrices (decayed) and 1-D tensors, i.e. norm weights and
    biases (never decayed: decaying a norm's scale towards 0 is not regularisation), whatever the optimiser."""
    params = [p for _, p in named_parameters if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2]}, {"params": [p for p in params if p.dim() < 2]}]
    if takes_weight_decay:
        groups[0]["weight_decay"], groups[1]["weight_decay"] = weight_decay, 0.0
    return [g for g in groups if g["params"]]


def lr_multiplier(step: int, schedule: LRSchedule, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """The learning rate at optimiser step `step` as a fraction of the peak: linear warm-up from 0 over
    `warmup_steps`, then constant, or a linear or cosine decay that reaches `min_lr_ratio` at `total_steps`.

    The curves of transformers' get_constant_schedule_with_warmup, get_linear_schedule_with_warmup,
    get_cosine_schedule_with_warmup and get_cosine_with_min_lr_schedule_with_warmup (`min_lr_rate`).
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * max(0.0, decay)


def state_bytes_per_parameter(optimizer: str, optimizer_args: dict[str, Any] | None, dtype: torch.dtype = torch.float32) -> float:
    """Bytes of optimiser state per trainable parameter element, measured: the optimiser steps once on
    two parameters of `dtype` and the growth of its state between them is divided by the growth in
    elements (so per-tensor constants, such as a step counter or 8-bit AdamW's quantisation maps,
    drop out). AdamW on float32: 8; SGD with momentum: 4; without: 0; 8-bit AdamW: 2 (+ 4 bytes of
    block statistics per 256)."""
    cls = optimizer_class(optimizer)
    kwargs = optimizer_kwargs(cls, 1e-3, 0.0, (0.9, 0.999), optimizer_args)
    sizes, state_bytes = (128 * 128, 256 * 128), []  # both >= bitsandbytes' min_8bit_size (4096): its 8-bit state is what is measured
    for numel in sizes:
        param = torch.nn.Parameter(torch.zeros(numel // 128, 128, dtype=dtype))
        param.grad = torch.full_like(param, 1e-3)
        opt = cls([param], **kwargs)
        opt.step()
        state_bytes.append(sum(t.numel() * t.element_size() for t in opt.state[param].values() if torch.is_tensor(t)))
    return (state_bytes[1] - state_bytes[0]) / (sizes[1] - sizes[0])
