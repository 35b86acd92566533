"""The head and loss in slices (model.SlicedHeadLoss): the unsliced loss and gradients within
float rounding, with masked targets, a padded vocabulary, under autocast, activation
checkpointing and torch.compile; the search for batch_size=auto trials the sliced step.

The tolerance, stated once. Both paths compute the same products; slicing only re-associates the
sums (the loss over positions, the head's gradient over positions). In fp32 every gradient is
within FP32_TOL of its largest entry, and the loss within FP32_TOL of itself (measured: 4e-7).
Under bf16 autocast the head's gradient is a bf16 matmul in both paths, rounded once over all
positions there and once per slice here, so gradients agree to bf16's rounding: BF16_TOL of the
largest entry (bf16 keeps 8 bits: 2^-8 = 0.0039; measured 0.0036); the loss, taken from fp32
logits in both, stays within FP32_TOL.
"""

import copy

import pytest
import torch

from gptforge import GPT, GPTConfig
from gptforge.config import ConfigError, RESUMABLE_KEYS
from gptforge.device import Precision
from gptforge.distributed import DistEnv, checkpoint_blocks
from gptforge.presets import resolve
from gptforge.step import fit_micro_batch
from test_train import _locale_is_utf8

FP32_TOL = 1e-5
BF16_TOL = 1e-2


def tiny(**kw) -> GPTConfig:
    return GPTConfig.preset("gpt2-tiny", vocab_size=100, **kw)


def batch(B: int = 3, T: int = 17) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    x = torch.randint(0, 100, (B, T))
    y = x.roll(-1, 1)
    y[0, :5] = -1  # masked targets, as conversation data has (data/loader.py)
    y[2, -3:] = -1
    return x, y


def loss_and_grads(model, x, y, amp=False, scale=0.5):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16, enabled=amp):
        _, loss = model(x, y)
    (loss * scale).backward()  # an incoming gradient other than 1, as accumulation gives
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_within(a: dict, b: dict, tol: float) -> None:
    for name, g in a.items():
        err = (g - b[name]).abs().max().item()
        assert err <= tol * g.abs().max().item(), (name, err)


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("shape", [dict(), dict(pad_vocab_multiple=64), dict(bias=False)],
                         ids=["plain", "padded-vocab", "no-bias"])
def test_slices_give_the_unsliced_loss_and_gradients(amp, shape):
    torch.manual_seed(0)
    whole = GPT(tiny(**shape))
    sliced = copy.deepcopy(whole)
    sliced.loss_slice = 7  # 51 positions: 7 full slices and one of 2
    x, y = batch()
    loss_a, grads_a = loss_and_grads(whole, x, y, amp)
    loss_b, grads_b = loss_and_grads(sliced, x, y, amp)
    assert abs(loss_a.item() - loss_b.item()) <= FP32_TOL * loss_a.item()
    assert_within(grads_a, grads_b, BF16_TOL if amp else FP32_TOL)
    # the masked positions count for nothing: the mean is over the 43 scored ones
    with torch.no_grad():
        logits, _ = whole(x)
        want = torch.nn.functional.cross_entropy(logits[y != -1], y[y != -1])
    assert abs(want.item() - loss_b.item()) <= FP32_TOL * want.item() or amp


def test_sliced_forward_without_gradients_and_a_batch_with_nothing_scored():
    torch.manual_seed(0)
    model = GPT(tiny(), loss_slice=5)
    x, y = batch()
    with torch.no_grad():  # evaluation: the loss only, and no logits
        logits, loss = model(x, y)
        model.loss_slice = 0
        _, want = model(x, y)
    assert logits is None
    assert abs(loss.item() - want.item()) <= FP32_TOL * want.item()
    model.loss_slice = 5
    _, nothing = model(x, torch.full_like(y, -1))
    assert nothing.isnan()  # 0 / 0, as F.cross_entropy's mean gives: the step is then skipped
    assert model(x)[0].shape == (3, 17, 100)  # no targets: logits, as generation takes them


@pytest.mark.slow
@pytest.mark.skipif(not _locale_is_utf8(), reason="torch.compile needs a UTF-8 locale here")
def test_sliced_loss_compiled_with_activation_checkpointing_equals_unsliced_eager():
    torch.manual_seed(0)
    whole = GPT(tiny(pad_vocab_multiple=64))
    sliced = copy.deepcopy(whole)
    sliced.loss_slice = 16
    checkpoint_blocks(sliced)
    compiled = torch.compile(sliced)
    x, y = batch()
    for amp in (False, True):
        loss_a, grads_a = loss_and_grads(whole, x, y, amp)
        loss_b, _ = loss_and_grads(compiled, x, y, amp)
        grads_b = {n: p.grad for n, p in sliced.named_parameters()}
        assert abs(loss_a.item() - loss_b.item()) <= FP32_TOL * loss_a.item()
        assert_within(grads_a, grads_b, BF16_TOL if amp else FP32_TOL)


def test_the_keys_turn_it_off_set_the_slice_and_may_change_on_resume():
    cfg = resolve("gpt2-tiny", None, [])
    assert cfg.train.sliced_loss is True and cfg.train.loss_slice_tokens == 1024
    with pytest.raises(ConfigError, match="train.loss_slice_tokens=0 is out of range"):
        resolve("gpt2-tiny", None, ["train.loss_slice_tokens=0"])
    assert {"train.sliced_loss", "train.loss_slice_tokens"} <= RESUMABLE_KEYS


@pytest.mark.parametrize("on, want", [("true", 32), ("false", 0)])
def test_the_batch_size_search_trials_the_step_the_run_takes(monkeypatch, on, want):
    """batch_size=auto's trial steps run the model as the run will: sliced (a lower peak, so a
    larger micro-batch) or not."""
    cfg = resolve("gpt2-tiny", None, ["model.vocab_size=65", "train.batch_size=auto", "train.device=cpu",
                                      f"train.sliced_loss={on}", "train.loss_slice_tokens=32"])
    cfg.model.pad_vocab_multiple = 1
    seen = []
    forward = GPT.forward

    def spy(self, idx, targets=None, kv_cache=None):
        seen.append(self.loss_slice)
        logits, loss = forward(self, idx, targets, kv_cache)
        assert (logits is None) == bool(want)  # sliced: the logits were never made
        return logits, loss

    monkeypatch.setattr(GPT, "forward", spy)
    fit_micro_batch(cfg, DistEnv(), Precision(torch.device("cpu"), None), "gpt2-tiny", search=True)
    assert seen and set(seen) == {want}
