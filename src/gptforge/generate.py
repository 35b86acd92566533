"""Sampling from a trained model: temperature, top-k, several samples as one batch."""

from __future__ import annotations

import warnings

import torch

from gptforge.checkpoint import build_model, load_checkpoint
from gptforge.config import SampleConfig
from gptforge.device import pick_device
from gptforge.errors import GptforgeError
from gptforge.model import GPT
from gptforge.tokenizer import tokenizer_from_dict


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    stop_id: int | None = None,
) -> list[list[int]]:
    """Continue each row of ``idx`` (B, T) by up to ``max_new_tokens`` sampled tokens.

    Returns the new tokens of each row; a row stops after it produces ``stop_id``, which is kept
    out of the result. The context is cropped to the model's block_size from the left.
    Logits cover the real vocabulary only, so padded ids are never produced.
    """
    block_size = model.config.block_size
    B = idx.size(0)
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -block_size:]
        logits, _ = model(idx_cond)
        logits = logits[:, -1, :].float() / temperature  # (B, V)
        if top_k and top_k < logits.size(-1):
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        nxt = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
        idx = torch.cat([idx, nxt], dim=1)
        for b, tok in enumerate(nxt[:, 0].tolist()):
            if done[b]:
                continue
            if stop_id is not None and tok == stop_id:
                done[b] = True
            else:
                out[b].append(tok)
        if bool(done.all()):
            break
    return out


def sample(ckpt_path: str, cfg: SampleConfig, device: str = "auto") -> list[str]:
    """Load a checkpoint and return ``cfg.num_samples`` texts: the prompt and its continuation."""
    ckpt = load_checkpoint(ckpt_path)
    tok = tokenizer_from_dict(ckpt.tokenizer)
    dev = pick_device(device)
    model = build_model(ckpt).to(dev)
    ids = tok.encode(cfg.prompt)
    if not ids:
        if tok.eot_id is None:
            raise GptforgeError("--prompt is empty: give at least one character to continue")
        ids = [tok.eot_id]  # GPT-2's way to sample unconditionally: start after a document end
    block = model.config.block_size
    if len(ids) > block:
        warnings.warn(f"the prompt has {len(ids)} tokens, more than the model's context of "
                      f"{block}: only its last {block} tokens are used")
    idx = torch.tensor([ids] * cfg.num_samples, dtype=torch.long, device=dev)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    outs = generate(model, idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, gen, tok.eot_id)
    return [cfg.prompt + tok.decode(o) for o in outs]
