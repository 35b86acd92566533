"""One optimizer step's arithmetic (step.py): accumulation, the norm, clipping, the update; and
its timer."""

import contextlib

import pytest
import torch

from gptforge import GPT, GPTConfig
from gptforge.config import OptimConfig
from gptforge.device import Precision
from gptforge.distributed import DistEnv
from gptforge.optim import lr_at
from gptforge.step import Stepper, StepTimer, build_trainable, train_step


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=40))


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, 40, (4, 12), generator=g)
        out.append((x, torch.roll(x, -1, 1)))
    return out


def feeder(items: list) -> callable:
    it = iter(items)
    return lambda: next(it)


def reference_grads(model: GPT, items: list) -> tuple[dict[str, torch.Tensor], float]:
    """Gradients of the mean loss over all the micro-batches' tokens, and their global norm,
    computed the plain way: one backward of the mean."""
    model.zero_grad(set_to_none=True)
    losses = [model(x, y)[1] for x, y in items]
    torch.stack(losses).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
    model.zero_grad(set_to_none=True)
    return grads, norm


@pytest.mark.parametrize("clip", [0.05, 0.3])
def test_the_update_uses_gradients_clipped_to_grad_clip(clip):
    """SGD with lr 1 makes the update equal the gradient it was given: it must be the mean
    gradient scaled to norm ``grad_clip`` exactly (the seed's clipping at 1.0), and the reported
    norm the one before clipping. A clip threshold off by any factor changes the update."""
    items = batches(2)
    model = tiny_model()
    grads, norm = reference_grads(model, items)
    assert norm > 2 * clip  # clipping is active, and would be at twice the threshold too
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    result = train_step(model, optimizer, feeder(items), 2, clip, contextlib.nullcontext)
    assert result.norm.item() == pytest.approx(norm, rel=1e-5)
    scale = clip / norm
    for n, p in model.named_parameters():
        torch.testing.assert_close(before[n] - p.detach(), grads[n] * scale, rtol=1e-4, atol=1e-7, msg=n)
    applied = torch.sqrt(sum(((before[n] - p.detach()).double() ** 2).sum() for n, p in model.named_parameters()))
    assert applied.item() == pytest.approx(clip, rel=1e-4)


def test_no_clipping_below_the_threshold_and_with_clip_0():
    items = batches(1)
    for clip in (0.0, 1e6):
        model = tiny_model()
        grads, norm = reference_grads(model, items)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        result = train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), feeder(items), 1,
                            clip, contextlib.nullcontext)
        assert result.norm.item() == pytest.approx(norm, rel=1e-5)
        for n, p in model.named_parameters():
            torch.testing.assert_close(before[n] - p.detach(), grads[n], rtol=1e-4, atol=1e-7, msg=n)


def test_accumulation_gives_the_gradient_and_loss_of_the_mean():
    """k micro-steps of B rows equal one step of the mean loss over k*B rows: loss reported as
    the mean of the micro-steps' losses, and the same gradient."""
    items = batches(3)
    model = tiny_model()
    grads, _ = reference_grads(model, items)
    want_loss = torch.stack([model(x, y)[1] for x, y in items]).mean().item()
    seen = {}

    class Recording(torch.optim.SGD):
        def step(self, closure=None):
            seen.update({id(p): p.grad.clone() for g in self.param_groups for p in g["params"]})
            return super().step(closure)

    optimizer = Recording(model.parameters(), lr=0.0)
    result = train_step(model, optimizer, feeder(items), 3, 0.0, contextlib.nullcontext)
    assert result.loss.item() == pytest.approx(want_loss, rel=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(seen[id(p)], grads[n], rtol=1e-5, atol=1e-7, msg=n)


def test_gradient_sync_only_on_the_last_micro_step_and_the_loss_reduced():
    items = batches(4)
    model = tiny_model()
    calls = []

    def grad_sync(last):
        calls.append(last)
        return contextlib.nullcontext()

    result = train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), feeder(items), 4, 1.0,
                        contextlib.nullcontext, grad_sync=grad_sync, reduce_mean=lambda t: t * 10)
    assert calls == [False, False, False, True]
    want = torch.stack([tiny_model()(x, y)[1] for x, y in items]).mean().item() * 10
    assert result.loss.item() == pytest.approx(want, rel=1e-5)


def test_the_stepper_sets_each_steps_learning_rate_from_the_schedule():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=3, decay_steps=10)
    trainable = build_trainable(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=40),
                                DistEnv(), Precision(torch.device("cpu"), None), seed=0)
    optimizer = torch.optim.SGD(trainable.model.parameters(), lr=123.0)
    stepper = Stepper(trainable, optimizer, feeder(batches(12)), 1, 1.0, schedule=cfg)
    for step in (0, 1, 5, 11):
        stepper(step)
        assert stepper.lr == lr_at(step, cfg)
        assert all(g["lr"] == lr_at(step, cfg) for g in optimizer.param_groups)
    # without a schedule the optimizer's own learning rate stays (bench)
    Stepper(trainable, optimizer, feeder(batches(1)), 1, 1.0)(0)
    assert all(g["lr"] == lr_at(11, cfg) for g in optimizer.param_groups)


def test_build_trainable_is_seeded_and_loads_before_wrapping():
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=40)
    cpu = Precision(torch.device("cpu"), None)
    a = build_trainable(cfg, DistEnv(), cpu, seed=7).model.state_dict()
    b = build_trainable(cfg, DistEnv(), cpu, seed=7).model.state_dict()
    c = build_trainable(cfg, DistEnv(), cpu, seed=8).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)
    zeroed = build_trainable(cfg, DistEnv(), cpu, seed=7, load=lambda m: torch.nn.init.zeros_(m.lm_head.weight))
    assert not zeroed.model.lm_head.weight.any() and zeroed.wrapped is zeroed.model
    assert zeroed.scaler is None and Precision(torch.device("cpu"), torch.float16).grad_scaler() is not None


def test_step_timer_measures_the_step():
    timer = StepTimer(torch.device("cpu"))
    timer.start()
    sum(range(100_000))
    timer.stop()
    assert 0 < timer.seconds() < 10
