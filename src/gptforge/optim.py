"""AdamW with decay / no-decay parameter groups, and the learning-rate schedule as a pure function."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from gptforge.config import OptimConfig


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Linear warmup ``lr * (step + 1) / warmup_steps`` (the +1 keeps step 0 from a zero lr), then a
    half cosine from ``lr`` at ``warmup_steps`` down to ``min_lr`` at ``decay_steps``, flat after.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.decay_steps:
        return cfg.min_lr
    ratio = (step - cfg.warmup_steps) / (cfg.decay_steps - cfg.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on tensors of 2 or more dimensions (matmul weights, embeddings) only;
    biases and LayerNorm gains are left alone, as in GPT-2 / GPT-3 practice."""
    params = [p for p in model.parameters() if p.requires_grad]  # the tied matrix appears once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW, fused on CUDA and CPU (one kernel for all parameters), multi-tensor elsewhere."""
    fused = device_type in ("cuda", "cpu")
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=lr_at(0, cfg),
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused,
        foreach=None if fused else True,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
