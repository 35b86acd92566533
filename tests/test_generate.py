"""Sampling: top-k, temperature, seeds, stopping at the end-of-text token."""

import torch

from gptforge import GPT, GPTConfig
from gptforge.generate import generate


def model_and_prompt(seed: int = 0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig.preset("gpt2-tiny", vocab_size=50)).eval()
    return model, torch.randint(0, 50, (3, 5))


def test_same_seed_same_tokens_and_rows_differ():
    model, idx = model_and_prompt()
    a = generate(model, idx, 20, top_k=10, generator=torch.Generator().manual_seed(1))
    b = generate(model, idx, 20, top_k=10, generator=torch.Generator().manual_seed(1))
    c = generate(model, idx, 20, top_k=10, generator=torch.Generator().manual_seed(2))
    assert a == b and a != c
    assert all(len(row) == 20 for row in a)


def test_top_1_is_greedy():
    model, idx = model_and_prompt()
    out = generate(model, idx[:1], 8, top_k=1, generator=torch.Generator().manual_seed(5))[0]
    seq = idx[:1]
    for tok in out:
        logits, _ = model(seq)
        assert tok == int(logits[0, -1].argmax())
        seq = torch.cat([seq, torch.tensor([[tok]])], dim=1)


def test_top_k_limits_the_choices():
    model, idx = model_and_prompt()
    logits, _ = model(idx[:1])
    allowed = set(torch.topk(logits[0, -1], 3).indices.tolist())
    for s in range(30):
        first = generate(model, idx[:1], 1, temperature=5.0, top_k=3,
                         generator=torch.Generator().manual_seed(s))[0][0]
        assert first in allowed


def test_stops_at_the_end_of_text_token():
    model, idx = model_and_prompt()
    with torch.no_grad():  # make token 7 certain after anything
        model.lm_head.weight.zero_()
        model.lm_head.weight[7] = 1.0
        model.transformer.ln_f.bias.fill_(10.0)
    out = generate(model, idx, 10, top_k=0, generator=torch.Generator().manual_seed(0), stop_id=7)
    assert out == [[], [], []]
    out = generate(model, idx, 4, top_k=0, generator=torch.Generator().manual_seed(0))
    assert out == [[7] * 4] * 3


def test_long_prompts_are_cropped_to_the_context():
    model, _ = model_and_prompt()
    idx = torch.randint(0, 50, (1, 200))  # block_size is 64
    out = generate(model, idx, 3, generator=torch.Generator().manual_seed(0))
    assert len(out[0]) == 3
