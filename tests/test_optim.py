"""Learning-rate schedule and AdamW parameter groups."""

import math

import pytest

from gptforge import GPT, GPTConfig
from gptforge.config import run_preset
from gptforge.optim import build_optimizer, lr_at


@pytest.mark.parametrize("step, expected", [
    (0, "6.00e-07"), (100, "6.06e-05"), (500, "3.01e-04"), (999, "6.00e-04"), (1000, "6.00e-04"),
])
def test_schedule_matches_the_originals_published_values(step, expected):
    optim = run_preset("gpt2-shakespeare").optim
    assert f"{lr_at(step, optim):.2e}" == expected


def test_schedule_shape():
    optim = run_preset("gpt2-shakespeare").optim
    assert lr_at(0, optim) == pytest.approx(6e-4 / 1000)
    assert lr_at(300_000, optim) == pytest.approx(6e-5)
    assert lr_at(10**7, optim) == pytest.approx(6e-5)
    # midway through the decay: halfway between max and min
    assert lr_at((1000 + 300_000) // 2, optim) == pytest.approx(3.3e-4, rel=1e-4)
    lrs = [lr_at(s, optim) for s in range(1000, 300_001, 997)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay
    assert math.isclose(lr_at(999, optim), lr_at(1000, optim))


def test_weight_decay_only_on_2d_weights():
    model = GPT(GPTConfig.preset("gpt2-tiny", vocab_size=50))
    opt = build_optimizer(model, run_preset("gpt2-shakespeare").optim, "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == model.num_params()  # every parameter once, the tied matrix included once
    assert opt.defaults["betas"] == (0.9, 0.95)
