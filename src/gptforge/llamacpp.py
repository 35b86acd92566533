"""GGUF files for llama.cpp (and what runs on it: llama-cpp-python, Ollama, LM Studio), written
with the ``gguf`` package that llama.cpp's authors maintain.

Why not through llama.cpp's ``convert_hf_to_gguf.py``: it names a BPE's pre-tokenizer by hashing
how a probe text tokenizes and looking the hash up in a table of known vocabularies, so a
vocabulary trained with ``prepare --tokenizer bpe`` always stops it ("BPE pre-tokenizer was not
recognized"). gptforge knows what its BPEs are, GPT-2's byte-level BPE with GPT-2's split, and
says so: ``tokenizer.ggml.pre = "gpt-2"``. The rest is what the converter writes for a GPT-2
model (its ``GPT2Model``): architecture ``gpt2``, the hyper-parameters, the tokens as their
byte-level strings with the merges, and the weights under llama.cpp's names in float32, the tied
output matrix written twice (``output.weight`` is ``token_embd.weight``). A padded vocabulary loses
its padding rows. ``<|endoftext|>`` is bos; eos is ``<|im_end|>`` for a chat model (generation
stops at the end of a turn) and ``<|endoftext|>`` otherwise; no bos is added to a text, as GPT-2
adds none. A chat model's ChatML template goes in ``tokenizer.chat_template``. A char vocabulary
has no GGUF tokenizer model and is refused.

The ``gguf`` package is imported only here, when ``export --format gguf`` runs (``pip install
'gptforge[gguf]'``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptforge.errors import GptforgeError
from gptforge.model import GPT
from gptforge.tokenizer import (
    CHAT_RECORD_KEY,
    CHATML_TEMPLATE,
    IM_END,
    IM_START,
    gpt2_vocab_files,
    tokenizer_from_dict,
)

LAYER_NORM_EPS = 1e-5
# gptforge's parameter -> llama.cpp's tensor (per block: "blk.N." + the name)
BLOCK_TENSORS = {
    "ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down",
}


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise GptforgeError("export --format gguf needs the gguf package: pip install "
                            "'gptforge[gguf]'") from None
    return gguf


def vocabulary(record: dict[str, Any]) -> tuple[list[str], list[str], list[int]]:
    """(tokens as byte-level strings in id order, merges "a b", special token ids) of a gpt2 or
    bpe tokenizer record."""
    name = record.get("name")
    if name == "gpt2":
        vocab_bpe, encoder_json = gpt2_vocab_files()
        with open(encoder_json, encoding="utf-8") as f:
            vocab = json.load(f)
        with open(vocab_bpe, encoding="utf-8") as f:
            merges = [line for line in f.read().split("\n")[1:] if line]
        tokens = sorted(vocab, key=vocab.__getitem__)
        special = [vocab["<|endoftext|>"]]
        if record.get(CHAT_RECORD_KEY) is not None:
            special += [len(tokens), len(tokens) + 1]
            tokens += [IM_START, IM_END]
        return tokens, merges, special
    if name == "bpe":
        spec = json.loads(tokenizer_from_dict(record).file_bytes())  # type: ignore[attr-defined]
        vocab = dict(spec["model"]["vocab"])
        special = []
        for added in spec.get("added_tokens", []):
            vocab[added["content"]] = added["id"]
            special.append(added["id"])
        tokens = sorted(vocab, key=vocab.__getitem__)
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
        return tokens, merges, special
    raise GptforgeError(f"a {name} vocabulary has no tokenizer llama.cpp can run (GGUF holds "
                        "GPT-2's BPE and byte-level BPEs): train the model on gpt2 or bpe data")


def tensors(model: GPT) -> dict[str, np.ndarray]:
    """llama.cpp's tensors for the model, float32, the vocabulary's padding rows dropped."""
    cfg = model.config
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["transformer.wte.weight"][: cfg.vocab_size],
           "position_embd.weight": sd["transformer.wpe.weight"],
           "output_norm.weight": sd["transformer.ln_f.weight"]}
    out["output.weight"] = out["token_embd.weight"]
    biases = {"output_norm.bias": "transformer.ln_f.bias"}
    for i in range(cfg.n_layer):
        for ours, theirs in BLOCK_TENSORS.items():
            out[f"blk.{i}.{theirs}.weight"] = sd[f"transformer.h.{i}.{ours}.weight"]
            biases[f"blk.{i}.{theirs}.bias"] = f"transformer.h.{i}.{ours}.bias"
    for theirs, ours in biases.items():  # a bias=False model: zeros compute the same
        weight = out[theirs.removesuffix(".bias") + ".weight"]
        out[theirs] = sd.get(ours, torch.zeros(weight.shape[0]))
    return {k: v.contiguous().numpy() for k, v in out.items()}


def write_gguf(path: Path, model: GPT, record: dict[str, Any], name: str) -> None:
    """Write ``model`` with its tokenizer ``record`` as a GGUF file at ``path`` (not atomic: the
    caller writes to a temporary name and renames)."""
    gguf = _import_gguf()
    tokens, merges, special = vocabulary(record)
    cfg = model.config
    if len(tokens) != cfg.vocab_size:
        raise GptforgeError(f"the tokenizer has {len(tokens):,} tokens but the model "
                            f"{cfg.vocab_size:,}: export the checkpoint the data was trained with")
    tok = tokenizer_from_dict(record)
    chat = record.get(CHAT_RECORD_KEY) is not None
    w = gguf.GGUFWriter(os.fspath(path), "gpt2")
    w.add_name(name)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(4 * cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_layer_norm_eps(LAYER_NORM_EPS)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # GPT-2's split: gptforge's BPEs all use it (tokenizer/bpe.py)
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                       for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.eot_id)
    w.add_eos_token_id(tok.im_end_id if chat else tok.eot_id)  # type: ignore[attr-defined]
    w.add_add_bos_token(False)
    if chat:
        w.add_eot_token_id(tok.im_end_id)  # type: ignore[attr-defined]
        w.add_chat_template(CHATML_TEMPLATE)
    for key, array in tensors(model).items():
        w.add_tensor(key, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
