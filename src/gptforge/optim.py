"""Optimizers (AdamW, or Muon for the blocks' matrices with AdamW for the rest), their parameter
groups, and the learning-rate schedule as a pure function."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn as nn
from torch.optim.adamw import adamw as adamw_update

from gptforge.config import OptimConfig


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Linear warmup ``lr * (step + 1) / warmup_steps`` (the +1 keeps step 0 from a zero lr), then
    down to ``min_lr`` at ``decay_steps``, flat after: ``cosine`` is a half cosine from the end of
    warmup; ``wsd`` (warmup-stable-decay, Hu et al. 2024, "MiniCPM") holds ``lr`` and decays
    linearly over the last ``cooldown_steps``, which for a run of known length reaches a lower
    loss than the cosine in our short runs.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.decay_steps:
        return cfg.min_lr
    if cfg.schedule == "wsd":
        left = (cfg.decay_steps - step) / cfg.cooldown_steps  # > 1 before the cooldown
        return cfg.min_lr + min(1.0, left) * (cfg.lr - cfg.min_lr)
    ratio = (step - cfg.warmup_steps) / (cfg.decay_steps - cfg.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)


def _decay_groups(params: list[torch.Tensor], weight_decay: float) -> list[dict]:
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on tensors of 2 or more dimensions (matmul weights, embeddings) only;
    biases and LayerNorm gains are left alone, as in GPT-2 / GPT-3 practice."""
    # parameters() yields the tied matrix once
    return _decay_groups([p for p in model.parameters() if p.requires_grad], weight_decay)


def is_muon_param(name: str, p: torch.Tensor) -> bool:
    """Muon is for the hidden matrices: every 2-D weight inside the transformer blocks. The
    embeddings and the (tied) output head, and all gains and biases, stay with AdamW, as in
    Jordan et al.'s Muon (https://kellerjordan.github.io/posts/muon/)."""
    return p.dim() == 2 and ".h." in f".{name}"


def muon_param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Muon for the blocks' matrices (lr scaled by ``muon_lr / lr`` so one schedule drives both),
    then AdamW's decay / no-decay groups (as ``param_groups``) for everything else."""
    muon, rest = [], []
    for name, p in model.named_parameters():  # the tied matrix appears once
        if p.requires_grad:
            (muon if is_muon_param(name, p) else rest).append(p)
    return [
        {"params": muon, "algorithm": "muon", "lr_scale": cfg.muon_lr / cfg.lr,
         "weight_decay": cfg.weight_decay},
        *_decay_groups(rest, cfg.weight_decay),  # MuonAdamW's defaults: algorithm adamw, lr_scale 1
    ]


def orthogonalize(g: torch.Tensor, steps: int) -> torch.Tensor:
    """Approximately U V^T for a stack of matrices G = U S V^T, (n, rows, cols) -> same shape.

    Newton-Schulz quintic iteration with Jordan's coefficients, which push every singular value
    into roughly [0.7, 1.2] in 5 steps rather than converging exactly (Jordan et al. 2024, "Muon").
    Works on the wide orientation (rows <= cols) so the Gram matrix X X^T is the small one.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = g.size(-2) > g.size(-1)
    x = g.mT if tall else g
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT  # (n, rows, rows)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b G + c G^2
        x = torch.baddbmm(x, poly, x, beta=a)  # a X + (b G + c G^2) X
    return x.mT if tall else x


class MuonAdamW(torch.optim.Optimizer):
    """Muon (momentum, then an orthogonalized update) for groups with ``algorithm="muon"``, AdamW
    for the others, as one optimizer: one state dict, one checkpoint format, one ``step``.

    Muon's update for a (rows, cols) matrix is ``lr * sqrt(max(1, rows/cols)) * orth(m)``, where
    m is the Nesterov momentum of the gradient; decay is decoupled (``p *= 1 - lr * wd``).
    torch.optim.Muon exists, but runs Newton-Schulz in bfloat16, which CPUs without bf16
    instructions emulate: it made a whole training step ~20x slower on our 2-core AVX2 machine
    (BENCHMARKS.md). Here the iteration runs in float32 on CPU (bf16 on CUDA), batched over the
    matrices of one shape.
    """

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float], eps: float,
                 momentum: float, ns_steps: int, fused: bool, shard: tuple[int, int] = (0, 1)):
        defaults = dict(lr=lr, betas=betas, eps=eps, momentum=momentum, ns_steps=ns_steps,
                        weight_decay=0.0, algorithm="adamw", lr_scale=1.0)
        super().__init__(groups, defaults)
        self.fused = fused
        self.rank, self.world_size = shard
        # As torch's fused optimizers: a 0-d tensor, 1.0 to skip the step on the device (no host
        # sync to decide it). Set by train_step for one step.
        self.found_inf: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        assert closure is None, "closures are not supported"
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon if group["algorithm"] == "muon" else self._adamw)(group, params)

    def _adamw(self, group: dict, params: list[torch.Tensor]) -> None:
        states = [self.state[p] for p in params]
        for p, st in zip(params, states):
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        adamw_update(
            params, [p.grad for p in params], [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states],
            fused=self.fused or None, foreach=None if self.fused else True,
            amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
            found_inf=self.found_inf,
        )

    def _muon(self, group: dict, params: list[torch.Tensor]) -> None:
        mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        skip = None if self.found_inf is None else self.found_inf.bool()
        by_shape: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        for p in params:
            st = self.state[p]
            if not st:
                st["momentum_buffer"] = torch.zeros_like(p)
            buf = st["momentum_buffer"]
            new = buf * mu + p.grad
            buf.copy_(new if skip is None else torch.where(skip, buf, new))
            by_shape[tuple(p.shape)].append((p, p.grad.add(new, alpha=mu)))  # Nesterov
        for (rows, cols), items in by_shape.items():
            ns_dtype = torch.bfloat16 if items[0][0].is_cuda else torch.float32
            stack = torch.stack([u for _, u in items]).to(ns_dtype)  # (n, rows, cols)
            update = self._orthogonalize(stack, group["ns_steps"])
            scale = lr * max(1.0, rows / cols) ** 0.5
            for (p, _), u in zip(items, update):
                new = p * (1.0 - lr * wd) - scale * u.to(p.dtype)
                p.copy_(new if skip is None else torch.where(skip, p, new))

    def _orthogonalize(self, stack: torch.Tensor, steps: int) -> torch.Tensor:
        """orthogonalize(stack), the work shared between ranks: under DDP every rank holds the
        same all-reduced gradients, so each rank takes a contiguous share of the matrices and the
        shares are gathered, which gives every rank the result of one process doing them all."""
        if self.world_size == 1:
            return orthogonalize(stack, steps)
        import torch.distributed as dist

        n, world = stack.size(0), self.world_size
        per = -(-n // world)  # ceil
        if per * world != n:  # pad with zero matrices (their result is zero) to equal shares
            stack = torch.cat([stack, stack.new_zeros(per * world - n, *stack.shape[1:])])
        mine = orthogonalize(stack[self.rank * per:(self.rank + 1) * per], steps).contiguous()
        shares = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(shares, mine)
        return torch.cat(shares)[:n]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str,
                    shard: tuple[int, int] = (0, 1)) -> torch.optim.Optimizer:
    """``optim.name=adamw``: AdamW over every parameter. ``muon``: Muon for the blocks' matrices,
    AdamW for the rest. AdamW is fused on CUDA and CPU (one kernel per group), multi-tensor
    elsewhere. ``shard=(rank, world)`` under DDP: Muon's ranks share the orthogonalization."""
    fused = device_type in ("cuda", "cpu")
    if cfg.name == "muon":
        optimizer = MuonAdamW(muon_param_groups(model, cfg), lr=cfg.lr,
                              betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                              momentum=cfg.muon_momentum, ns_steps=cfg.ns_steps, fused=fused,
                              shard=shard)
        set_lr(optimizer, lr_at(0, cfg))
        return optimizer
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=lr_at(0, cfg),
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused,
        foreach=None if fused else True,
    )


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer can skip a step on the device from a ``found_inf`` flag, so that no
    host sync is needed to keep a non-finite step out of the weights: ours, and torch's fused
    AdamW (the mechanism GradScaler uses)."""
    return isinstance(optimizer, MuonAdamW) and optimizer.fused or bool(
        isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults.get("fused"))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state once every parameter has taken a step (it is created lazily):
    AdamW keeps two moments per parameter, Muon one momentum buffer, each of the parameter's
    dtype. (A sharded parameter counts whole: checkpoints hold full tensors.)"""
    total = 0
    for group in optimizer.param_groups:
        slots = 1 if group.get("algorithm") == "muon" else 2
        total += sum(p.numel() * p.element_size() * slots for p in group["params"])
    return total


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's lr on every group; Muon's groups carry their own ratio to it."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
