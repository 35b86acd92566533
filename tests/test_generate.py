"""Sampling: the KV cache, top-k, top-p, temperature, seeds, stopping, streaming, cropping."""

import pytest
import torch
from test_train import run_cli

from gptforge import GPT, GPTConfig
from gptforge.cli.commands import sample_config
from gptforge.config import SampleConfig
from gptforge.generate import TextStream, filter_logits, generate, sample
from gptforge.hf import write_hf_dir
from gptforge.tokenizer import CharTokenizer, GPT2Tokenizer


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


@pytest.mark.parametrize("use_cache", [True, False])
def test_long_prompts_keep_their_last_block_size_tokens(use_cache):
    model, _ = model_and_prompt()
    idx = torch.randint(0, 50, (1, 200), generator=torch.Generator().manual_seed(0))  # block_size 64
    out = generate(model, idx, 8, top_k=1, use_cache=use_cache)
    assert out == generate(model, idx[:, -64:], 8, top_k=1, use_cache=use_cache)
    assert out != generate(model, idx[:, :64], 8, top_k=1, use_cache=use_cache)  # it matters which


# ----------------------------------------------------------------------------------------------
# The KV cache


def test_cached_forward_equals_the_full_forward():
    model, _ = model_and_prompt()
    idx = torch.randint(0, 50, (3, 64))  # a whole block
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_kv_cache()
        parts = [model(idx[:, a:b], kv_cache=cache)[0] for a, b in [(0, 10), (10, 11), (11, 40), (40, 64)]]
    assert cache.length == 64
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(idx[:, :1], kv_cache=cache)


def test_last_only_is_the_last_positions_logits():
    model, _ = model_and_prompt()
    idx = torch.randint(0, 50, (3, 20))
    with torch.no_grad():
        full, _ = model(idx)
        last, _ = model(idx, last_only=True)
        cached, _ = model(idx, kv_cache=model.new_kv_cache(), last_only=True)
    assert last.shape == (3, 1, full.size(-1))
    torch.testing.assert_close(last, full[:, -1:], rtol=0, atol=1e-6)
    torch.testing.assert_close(cached, full[:, -1:], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="no targets"):
        model(idx, targets=idx, last_only=True)


@pytest.mark.parametrize("prompt_len, new", [(5, 30), (50, 40), (64, 10), (200, 5)])
def test_greedy_with_cache_equals_without_it_across_the_context(prompt_len, new):
    """block_size is 64: these cross it from below, start at it, and start past it."""
    model, _ = model_and_prompt()
    idx = torch.randint(0, 50, (2, prompt_len))
    cached = generate(model, idx, new, top_k=1, use_cache=True)
    uncached = generate(model, idx, new, top_k=1, use_cache=False)
    assert cached == uncached and all(len(row) == new for row in cached)


def test_cache_same_seed_same_samples():
    model, idx = model_and_prompt()
    a = generate(model, idx, 30, top_k=0, generator=torch.Generator().manual_seed(3))
    b = generate(model, idx, 30, top_k=0, generator=torch.Generator().manual_seed(3))
    assert a == b and a[0] != a[1]  # several samples in one batch, each its own


# ----------------------------------------------------------------------------------------------
# Top-p, streaming, stop strings


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))

    def kept(p: float) -> list[bool]:
        return torch.isfinite(filter_logits(logits, top_p=p))[0].tolist()

    assert kept(0.79) == [False, True, False, True]  # 0.5 + 0.3 reaches 0.79
    assert kept(0.81) == [False, True, True, True]
    assert kept(0.1) == [False, True, False, False]  # the most likely token always survives
    assert kept(1.0) == [True] * 4
    both = torch.isfinite(filter_logits(logits, top_k=1, top_p=0.9))[0].tolist()
    assert both == [False, True, False, False]


def test_top_p_limits_the_choices():
    model, idx = model_and_prompt()
    with torch.no_grad():
        probs = torch.softmax(model(idx[:1])[0][0, -1] / 3.0, dim=-1)
    order = torch.argsort(probs, descending=True).tolist()
    mass, allowed = 0.0, set()
    for tok in order:  # the nucleus for p = 0.3, computed independently
        if mass >= 0.3:
            break
        allowed.add(tok)
        mass += float(probs[tok])
    assert 1 < len(allowed) < 50
    seen = {generate(model, idx[:1], 1, temperature=3.0, top_p=0.3,
                     generator=torch.Generator().manual_seed(s))[0][0] for s in range(40)}
    assert seen <= allowed and len(seen) > 1


def test_the_callback_sees_every_token_and_can_end_a_row():
    model, idx = model_and_prompt()
    seen: list[tuple[int, int]] = []
    out = generate(model, idx, 12, top_k=5, generator=torch.Generator().manual_seed(0),
                   on_token=lambda b, t: seen.append((b, t)))
    assert [t for b, t in seen if b == 1] == out[1] and len(seen) == 3 * 12
    # Returning True ends that row only: here row 0 after its third token.
    counts = [0, 0, 0]

    def stop_row0(b: int, t: int) -> bool:
        counts[b] += 1
        return b == 0 and counts[0] == 3

    out2 = generate(model, idx, 12, top_k=5, generator=torch.Generator().manual_seed(0),
                    on_token=stop_row0)
    assert out2[0] == out[0][:3] and out2[1:] == out[1:]


def test_text_stream_holds_partial_characters():
    tok = GPT2Tokenizer()
    text = "naïve café 😀 done"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the emoji spans several tokens
    pieces: list[str] = []
    stream = TextStream(tok, emit=pieces.append)
    for i in ids:
        assert not stream.push(i)
    assert stream.finish() == text and "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_text_stream_stops_before_the_stop_string():
    tok = CharTokenizer("abcdef\n ")
    pieces: list[str] = []
    stream = TextStream(tok, stops=["\n\n", "fed"], emit=pieces.append)
    results = [stream.push(i) for i in tok.encode("abc de\nf\n\nabc")]
    assert results.index(True) == 9  # the second newline of "\n\n"
    assert stream.finish() == "abc de\nf" and "".join(pieces) == "abc de\nf"
    stream = TextStream(tok, stops=["fed"], emit=pieces.append)
    for i in tok.encode("a fe fed b"):
        if stream.push(i):
            break
    assert stream.finish() == "a fe "


def test_sample_stop_string_and_streaming(tmp_path, capsys):
    """gptforge sample on a directory hf.py wrote: stop strings, streaming, the cache flag."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("gpt2-tiny", vocab_size=50257)).eval()
    d = tmp_path / "hf"
    d.mkdir()
    write_hf_dir(d, model, {"name": "gpt2"}, {})
    base = ["sample", "--ckpt", str(d), "--prompt", "The", "--max-new-tokens", "20", "--top-k", "1",
            "--weights-dtype", "float32"]  # compared with the fp32 model's tokens
    assert run_cli(*base) == 0
    full = capsys.readouterr().out
    assert run_cli(*base, "--no-cache") == 0
    assert capsys.readouterr().out == full
    tok = GPT2Tokenizer()
    ids = generate(model, torch.tensor([tok.encode("The")]), 20, top_k=1, stop_id=tok.eot_id)[0]
    assert full == "The" + tok.decode(ids) + "\n"
    stop = tok.decode(ids[4:6])
    assert run_cli(*base, "--stop", stop) == 0
    assert capsys.readouterr().out == full[: full.index(stop, len("The"))] + "\n"

    streamed: list[tuple[int, str]] = []
    cfg = SampleConfig(prompt="The", max_new_tokens=20, top_k=1, num_samples=2)
    texts = sample(str(d), cfg.prompt, cfg.to_sampling(), cfg.num_samples, device="cpu",
                   stream=lambda b, s: streamed.append((b, s)), weights_dtype="float32")
    assert texts == [full[:-1]] * 2
    assert "".join(s for b, s in streamed if b == 1) == full[len("The"):-1]
    assert run_cli(*base, "--top-p", "1.5") == 2
    assert "--top-p" in capsys.readouterr().err


def test_a_runs_sample_section_sets_the_defaults_of_sample_and_chat_and_a_flag_overrides_it(char_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli("train", "--data", str(char_data), "--out", str(run), "--preset", "gpt2-tiny",
                   "--set", "train.max_steps=2", "--set", "train.device=cpu",
                   "--set", "train.dtype=float32", "--set", "sample.prompt=ROMEO:",
                   "--set", "sample.max_new_tokens=12", "--set", "sample.temperature=0",
                   "--set", "sample.weights_dtype=float32") == 0
    capsys.readouterr()
    assert run_cli("sample", "--ckpt", str(run), "--device", "cpu") == 0
    out, err = capsys.readouterr()
    assert ("sampling with the run's [sample] section: prompt='ROMEO:', max_new_tokens=12, "
            "temperature=0.0, weights_dtype='float32' (a flag overrides it)") in err
    explicit = ["sample", "--ckpt", str(run), "--device", "cpu", "--prompt", "ROMEO:",
                "--max-new-tokens", "12", "--temperature", "0", "--weights-dtype", "float32"]
    assert run_cli(*explicit) == 0
    same, err = capsys.readouterr()
    assert same == out and out.startswith("ROMEO:") and "[sample]" not in err  # every value given
    assert run_cli("sample", "--ckpt", str(run), "--device", "cpu", "--max-new-tokens", "3") == 0
    shorter, err = capsys.readouterr()
    assert shorter == out[:len("ROMEO:") + 3] + "\n" and "max_new_tokens" not in err
    # the checkpoint directory itself carries the same section
    assert run_cli("sample", "--ckpt", str(run / "checkpoints" / "step_0000002"), "--device", "cpu") == 0
    assert capsys.readouterr().out == out
    # chat's sampling values come the same way (chat itself refuses this char model)
    chat = sample_config(str(run), {"temperature": None, "top_k": 5, "seed": None})
    assert (chat.temperature, chat.top_k, chat.seed) == (0.0, 5, SampleConfig().seed)
    assert "temperature=0.0 (a flag overrides it)" in capsys.readouterr().err
