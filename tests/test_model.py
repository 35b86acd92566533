"""The model: exact GPT-2 shapes and parameter count, causality, tying, init, padded vocab."""

import math

import pytest
import torch

from gptforge import GPT, GPTConfig
from gptforge.config import MODEL_PRESETS, ConfigError


def tiny(**kw) -> GPTConfig:
    return GPTConfig.preset("gpt2-tiny", vocab_size=kw.pop("vocab_size", 100), **kw)


def test_gpt2_has_exactly_the_original_parameter_count():
    # Build on the meta device: the count needs shapes, not 500 MB of weights.
    with torch.device("meta"):
        model = GPT(GPTConfig.preset("gpt2"))
    assert model.num_params() == 124_439_808


@pytest.mark.parametrize("name, layers, width, heads, params", [
    ("gpt2-medium", 24, 1024, 16, 354_823_168),
    ("gpt2-large", 36, 1280, 20, 774_030_080),
    ("gpt2-xl", 48, 1600, 25, 1_557_611_200),
])
def test_larger_presets_match_published_gpt2_shapes(name, layers, width, heads, params):
    cfg = GPTConfig.preset(name)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.block_size, cfg.vocab_size) == (
        layers, width, heads, 1024, 50257)
    with torch.device("meta"):
        assert GPT(cfg).num_params() == params  # Hugging Face's counts for the released models


def test_parameter_names_are_gpt2s():
    names = set(GPT(tiny()).state_dict())
    for key in ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
                "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.bias",
                "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight",
                "transformer.h.1.ln_2.bias", "transformer.ln_f.weight", "lm_head.weight"]:
        assert key in names


def test_forward_shapes_and_loss():
    torch.manual_seed(0)
    model = GPT(tiny())
    idx = torch.randint(0, 100, (3, 17))
    logits, loss = model(idx)
    assert logits.shape == (3, 17, 100) and loss is None
    logits, loss = model(idx, idx)
    assert loss.ndim == 0
    # At init the prediction is close to uniform: loss near ln(V).
    assert abs(loss.item() - math.log(100)) < 0.5


def test_changing_a_future_token_never_changes_earlier_logits():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    idx = torch.randint(0, 100, (2, 20))
    base, _ = model(idx)
    for t in [0, 5, 18]:
        changed = idx.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % 100
        out, _ = model(changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=0)
        assert not torch.equal(out[:, t + 1], base[:, t + 1])


def test_token_embedding_and_head_share_one_matrix():
    model = GPT(tiny())
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    # A gradient through either use lands in the same tensor.
    idx = torch.randint(0, 100, (2, 8))
    _, loss = model(idx, idx)
    loss.backward()
    assert model.lm_head.weight.grad is model.transformer.wte.weight.grad


def test_init_std_and_residual_scaling():
    torch.manual_seed(0)
    cfg = GPTConfig.preset("gpt2-mini", vocab_size=5000, n_layer=8)
    model = GPT(cfg)
    resid = torch.cat([model.transformer.h[i].attn.c_proj.weight.flatten() for i in range(8)]
                      + [model.transformer.h[i].mlp.c_proj.weight.flatten() for i in range(8)])
    plain = torch.cat([model.transformer.h[i].mlp.c_fc.weight.flatten() for i in range(8)])
    assert abs(plain.std().item() - 0.02) < 0.001
    assert abs(resid.std().item() - 0.02 / math.sqrt(2 * 8)) < 0.0005
    assert abs(model.transformer.wte.weight.std().item() - 0.02) < 0.001
    assert model.transformer.h[0].attn.c_attn.bias.abs().sum() == 0
    assert torch.all(model.transformer.ln_f.weight == 1)


def test_padded_vocab_rows_are_never_predicted():
    cfg = tiny(vocab_size=100, pad_vocab_multiple=64)
    assert cfg.padded_vocab_size == 128
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    assert model.transformer.wte.weight.shape[0] == 128
    # Make the padded rows overwhelmingly attractive: if they leaked into the logits, every
    # argmax and nearly every sample would be a padded id.
    with torch.no_grad():
        model.lm_head.weight[100:] = 50.0
        model.transformer.ln_f.weight.fill_(1.0)
    idx = torch.randint(0, 100, (4, 10))
    logits, loss = model(idx, idx)
    assert logits.shape[-1] == 100
    assert torch.isfinite(loss)
    from gptforge.generate import generate
    out = generate(model, idx, 30, temperature=2.0, top_k=0,
                   generator=torch.Generator().manual_seed(0))
    assert max(max(row) for row in out) < 100


def test_gpt2_padded_to_50304():
    assert GPTConfig.preset("gpt2", pad_vocab_multiple=64).padded_vocab_size == 50304


def test_dropout_is_used_in_training_and_not_in_eval():
    torch.manual_seed(0)
    model = GPT(tiny(dropout=0.5))
    idx = torch.randint(0, 100, (2, 8))
    model.train()
    a, _ = model(idx)
    b, _ = model(idx)
    assert not torch.equal(a, b)
    model.eval()
    a, _ = model(idx)
    b, _ = model(idx)
    assert torch.equal(a, b)


def test_bad_model_configs_name_the_key():
    with pytest.raises(ConfigError, match="model.n_embd"):
        GPTConfig.preset("gpt2-tiny", n_embd=33)
    with pytest.raises(ConfigError, match="unknown model preset"):
        GPTConfig.preset("gpt5")
    assert set(MODEL_PRESETS) >= {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt2-tiny", "gpt2-mini"}


def test_sequence_longer_than_context_is_refused():
    model = GPT(tiny())
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.slow
def test_gpt2_124m_takes_one_training_step():
    """The full-size preset builds, runs forward and backward, and AdamW updates it."""
    from gptforge.presets import run_preset
    from gptforge.optim import build_optimizer

    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("gpt2"))
    opt = build_optimizer(model, run_preset("gpt2-shakespeare").optim, "cpu")
    idx = torch.randint(0, 50257, (2, 64))
    targets = torch.randint(0, 50257, (2, 64))
    _, loss = model(idx, targets)
    # Near-uniform at init: ln(50257) = 10.82, plus ~var/2 = 0.15 for logits of std ~0.55.
    assert abs(loss.item() - math.log(50257)) < 0.5
    loss.backward()
    before = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.transformer.h[0].attn.c_attn.weight)
