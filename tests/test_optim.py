"""Learning-rate schedules, AdamW parameter groups, and Muon."""

import math

import pytest
import torch

from gptforge import GPT, GPTConfig
from gptforge.presets import run_preset
from gptforge.optim import MuonAdamW, build_optimizer, lr_at, orthogonalize, set_lr


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


def test_wsd_holds_then_decays_linearly_to_min_lr():
    optim = run_preset("shakespeare-char-speedrun").optim
    optim.min_lr = 1e-4
    w, end, cool = optim.warmup_steps, optim.decay_steps, optim.cooldown_steps
    assert lr_at(0, optim) == pytest.approx(optim.lr / w)
    assert lr_at(w, optim) == lr_at(end - cool, optim) == optim.lr  # stable
    mid = end - cool // 2
    assert lr_at(mid, optim) == pytest.approx(optim.min_lr + (optim.lr - optim.min_lr) * (end - mid) / cool)
    assert lr_at(end, optim) == lr_at(end + 100, optim) == pytest.approx(1e-4)
    lrs = [lr_at(s, optim) for s in range(w, end + 1)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


@pytest.mark.parametrize("shape", [(3, 16, 48), (2, 48, 16), (1, 20, 20)])
def test_orthogonalize_equalises_singular_values_and_keeps_singular_vectors(shape):
    torch.manual_seed(0)
    # Singular values spread over 3 orders of magnitude, as in real gradients.
    u, _, vh = torch.linalg.svd(torch.randn(shape), full_matrices=False)
    s = torch.logspace(0, -3, min(shape[1:])).expand(shape[0], -1)
    g = u @ torch.diag_embed(s) @ vh
    o = orthogonalize(g, steps=5)
    assert o.shape == g.shape
    # In G's own singular basis the result is diagonal, with values pushed near 1.
    d = u.mT @ o @ vh.mT  # (n, k, k)
    diag = torch.diagonal(d, dim1=-2, dim2=-1)
    off = d - torch.diag_embed(diag)
    assert off.abs().max() < 1e-4
    big = diag[:, : diag.size(1) // 2]  # the larger half of the singular values
    assert big.min() > 0.6 and diag.max() < 1.25


def test_muon_groups_take_exactly_the_blocks_matrices():
    model = GPT(GPTConfig.preset("gpt2-tiny", vocab_size=50))
    optim = run_preset("shakespeare-char-speedrun").optim
    opt = build_optimizer(model, optim, "cpu")
    assert isinstance(opt, MuonAdamW)
    muon, decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in muon["params"]) == sorted(
        n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2)
    assert {names[id(p)] for p in decay["params"]} == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()
    set_lr(opt, optim.lr)
    assert muon["lr"] == pytest.approx(optim.muon_lr) and decay["lr"] == optim.lr


def test_muon_step_matches_a_per_matrix_reference_and_adamw_matches_torch():
    """Three steps of MuonAdamW == Muon written out per matrix + torch's own AdamW for the rest.

    Both get the same given gradients, so a difference can only come from the optimizers."""
    torch.manual_seed(0)
    cfg = GPTConfig.preset("gpt2-tiny", vocab_size=50)
    model = GPT(cfg)
    ref = GPT(cfg)
    ref.load_state_dict(model.state_dict())
    optim = run_preset("shakespeare-char-speedrun").optim
    optim.weight_decay = 0.1
    opt = build_optimizer(model, optim, "cpu")
    set_lr(opt, optim.lr)

    named = dict(ref.named_parameters())
    hidden = {n: p for n, p in named.items() if n.startswith("transformer.h.") and p.dim() == 2}
    rest = [p for n, p in named.items() if n not in hidden]
    ref_adamw = torch.optim.AdamW(
        [{"params": [p for p in rest if p.dim() == 2], "weight_decay": 0.1},
         {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}],
        lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
    bufs = {n: torch.zeros_like(p) for n, p in hidden.items()}
    for _ in range(3):
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            p.grad = torch.randn_like(p) * (0.1 if n in hidden else 1e-3)
            q.grad = p.grad.clone()
        opt.step()
        ref_adamw.step()
        with torch.no_grad():
            for n, p in hidden.items():
                mu, lr = optim.muon_momentum, optim.muon_lr
                bufs[n] = mu * bufs[n] + p.grad
                update = orthogonalize((p.grad + mu * bufs[n])[None], optim.ns_steps)[0]
                p.mul_(1 - lr * 0.1)
                p.sub_(lr * max(1.0, p.size(0) / p.size(1)) ** 0.5 * update)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, named[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_orthogonalize_in_bf16_as_on_cuda_tracks_fp32():
    """CUDA runs the iteration in bf16; the same code in bf16 on CPU stays close to fp32."""
    torch.manual_seed(0)
    g = torch.randn(2, 32, 96)
    o32 = orthogonalize(g, steps=5)
    o16 = orthogonalize(g.bfloat16(), steps=5)
    assert o16.dtype == torch.bfloat16
    assert (o16.float() - o32).norm() / o32.norm() < 0.05
