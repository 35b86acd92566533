"""Hugging Face GPT-2 directories <-> gptforge's GPT, with no transformers needed.

A Hugging Face GPT-2 directory (what ``GPT2LMHeadModel.save_pretrained`` writes) holds:
    config.json             GPT2Config: model_type "gpt2", n_layer, n_head, n_embd, n_positions, ...
    model.safetensors       weights (or pytorch_model.bin, or shards listed in an *.index.json)
    vocab.json, merges.txt  the GPT-2 BPE tokenizer (optional for reading)

gptforge's model uses GPT-2's own parameter names, so the conversion is a key prefix
(``transformer.``), four transposes (HF stores c_attn, attn.c_proj, c_fc and mlp.c_proj as Conv1D,
weight (in, out); nn.Linear stores (out, in)) and the tied wte/lm_head matrix stored once.
Everything here reads and writes plain files (JSON, safetensors); the optional transformers
package is only needed to *use* an exported directory, never to write or read one.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptforge.config import ConfigError, GPTConfig, validate
from gptforge.errors import GptforgeError
from gptforge.model import GPT
from gptforge.tokenizer import (
    BPE_FILE,
    CHAT_RECORD_KEY,
    CHATML_TEMPLATE,
    GPT2_CHAT_VOCAB_SIZE,
    GPT2_EOT,
    GPT2_EOT_ID,
    GPT2_VOCAB_SIZE,
    IM_END,
    IM_START,
    stop_ids,
    gpt2_vocab_files,
    hf_tokenizer_files,
    load_bpe,
    tokenizer_from_dict,
)

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
GPTFORGE_TOKENIZER_FILE = "gptforge_tokenizer.json"  # a char vocabulary, for --weights-only
GENERATION_CONFIG_FILE = "generation_config.json"  # a chat model's: eos = end of text and of turn
GPT2_IM_START_ID, GPT2_IM_END_ID = GPT2_VOCAB_SIZE, GPT2_VOCAB_SIZE + 1

# Linear layers HF stores as Conv1D: weight transposed, (in_features, out_features).
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Old transformers versions saved each layer's causal mask as a buffer; it holds no weights.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
HF_PREFIX = "transformer."
TIED_KEY = "lm_head.weight"
# GPT-2's tanh GELU under the names transformers gives it (gelu_new is what GPT-2 configs say).
TANH_GELU_NAMES = ("gelu_new", "gelu_pytorch_tanh")
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, the value GPT-2 uses


class HFFormatError(GptforgeError):
    """A directory is not a Hugging Face GPT-2 model that gptforge can read or write."""


# ----------------------------------------------------------------------------------------------
# Reading


def is_hf_dir(path: str | Path) -> bool:
    """True when ``path`` looks like a Hugging Face model directory (config.json with model_type)."""
    p = Path(path) / CONFIG_FILE
    if not p.is_file():
        return False
    try:
        return "model_type" in json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        return False


def read_hf_config(path: str | Path) -> GPTConfig:
    """The GPTConfig of a Hugging Face GPT-2 directory, refusing what gptforge's GPT cannot compute."""
    p = Path(path)
    cfg_path = p / CONFIG_FILE
    if not cfg_path.is_file():
        raise HFFormatError(
            f"{p} has no {CONFIG_FILE}: pass a Hugging Face GPT-2 directory (save_pretrained output)"
        )
    try:
        hf = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise HFFormatError(f"{cfg_path} is not valid JSON ({e}): re-save the model") from None
    if not isinstance(hf, dict):
        raise HFFormatError(f"{cfg_path} is not a JSON object: re-save the model")
    if hf.get("model_type") != "gpt2":
        raise HFFormatError(
            f"{cfg_path} has model_type {hf.get('model_type')!r}: gptforge reads GPT-2 models "
            "(model_type \"gpt2\") only"
        )
    missing = [k for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size") if k not in hf]
    if missing:
        raise HFFormatError(f"{cfg_path} lacks {', '.join(missing)}: re-save the model with transformers")

    def refuse(key: str, why: str) -> None:
        raise HFFormatError(
            f"{cfg_path}: {key}={hf.get(key)!r} is not supported ({why}): gptforge computes "
            "GPT-2 exactly and cannot run this variant"
        )

    if hf.get("activation_function", "gelu_new") not in TANH_GELU_NAMES:
        refuse("activation_function", "GPT-2 uses the tanh GELU, gelu_new")
    n_inner = hf.get("n_inner")
    if n_inner is not None and n_inner != 4 * hf["n_embd"]:
        refuse("n_inner", "the MLP is 4 x n_embd wide")
    eps = hf.get("layer_norm_epsilon", LAYER_NORM_EPS)
    if not isinstance(eps, (int, float)) or not math.isclose(eps, LAYER_NORM_EPS):
        refuse("layer_norm_epsilon", f"LayerNorm uses eps={LAYER_NORM_EPS}")
    if hf.get("scale_attn_weights", True) is not True:
        refuse("scale_attn_weights", "attention scores are scaled by 1/sqrt(head size)")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        refuse("scale_attn_by_inverse_layer_idx", "no per-layer attention scaling")
    if hf.get("add_cross_attention", False):
        refuse("add_cross_attention", "a decoder without cross-attention")
    if hf.get("tie_word_embeddings", True) is not True:
        refuse("tie_word_embeddings", "the output layer shares the token embedding matrix")
    try:
        cfg = GPTConfig(n_layer=int(hf["n_layer"]), n_head=int(hf["n_head"]), n_embd=int(hf["n_embd"]),
                        block_size=int(hf["n_positions"]), vocab_size=int(hf["vocab_size"]),
                        pad_vocab_multiple=1, dropout=0.0, bias=True)
        validate(cfg, "model")
    except (TypeError, ValueError) as e:
        raise HFFormatError(f"{cfg_path} has a non-integer model size ({e}): re-save the model") from None
    except ConfigError as e:
        raise HFFormatError(f"{cfg_path} describes a model gptforge cannot build ({e})") from None
    return cfg


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The raw tensors of a HF directory: safetensors (single or sharded), else a weights-only .bin."""
    fix = "re-save it with save_pretrained(dir, safe_serialization=True)"
    index = path / SAFETENSORS_INDEX
    if (path / SAFETENSORS_FILE).is_file():
        files = [path / SAFETENSORS_FILE]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = [path / name for name in sorted(set(weight_map.values()))]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise HFFormatError(f"{index} is corrupt ({e!r}): {fix}") from None
    elif (path / PICKLE_FILE).is_file():
        bin_path = path / PICKLE_FILE
        try:
            # weights_only: a pickle that names anything but tensors is refused, not executed.
            sd = torch.load(bin_path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
            # torch's message is a paragraph; keep the line that names what was refused.
            lines = [ln for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln]
            why = lines[0].strip().rstrip(".") if lines else type(e).__name__
            raise HFFormatError(
                f"{bin_path} cannot be loaded safely as plain tensors ({why}): {fix}"
            ) from None
        if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
            raise HFFormatError(f"{bin_path} is not a state dict of tensors: {fix}")
        return sd
    else:
        raise HFFormatError(
            f"{path} has a config.json but no weights ({SAFETENSORS_FILE} or {PICKLE_FILE}): "
            "copy the weights file into it"
        )
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise HFFormatError(f"weights file {f} is missing: copy it into {path}")
        try:
            out.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise HFFormatError(f"weights file {f} is corrupt or truncated ({e}): {fix}") from None
    return out


def hf_to_gptforge(hf_sd: dict[str, torch.Tensor], cfg: GPTConfig, where: str) -> dict[str, torch.Tensor]:
    """HF GPT-2 tensors -> gptforge state dict (without the tied lm_head.weight), checked strictly."""
    expected = _expected_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    for key, t in hf_sd.items():
        # GPT2LMHeadModel saves "transformer.h.0...", a bare GPT2Model "h.0...".
        name = key if key.startswith(HF_PREFIX) or key == TIED_KEY else HF_PREFIX + key
        if name.endswith(IGNORED_SUFFIXES) or name == TIED_KEY:
            # lm_head.weight is the tied wte matrix (tie_word_embeddings was checked).
            continue
        if name not in expected:
            raise HFFormatError(
                f"{where} holds {key!r}, which a GPT-2 of this config does not have: "
                "it is not a GPT-2 checkpoint, or its config.json does not match the weights"
            )
        if name.endswith(CONV1D_SUFFIXES):
            t = t.t()  # Conv1D (in, out) -> nn.Linear (out, in)
        if tuple(t.shape) != tuple(expected[name]):
            raise HFFormatError(
                f"{where}: {key} has shape {tuple(t.shape)} (as nn.Linear), config.json implies "
                f"{tuple(expected[name])}: the weights do not match the config"
            )
        out[name] = t.to(torch.float32).contiguous()
    missing = [k for k in expected if k not in out]
    if missing:
        raise HFFormatError(
            f"{where} lacks {len(missing)} weights (first: {missing[0]}): "
            "the weights file is incomplete or not a GPT-2 checkpoint"
        )
    return out


def _expected_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """gptforge parameter names -> shapes for ``cfg`` (tied lm_head left out), without a model."""
    C, V = cfg.n_embd, cfg.padded_vocab_size
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (V, C),
        "transformer.wpe.weight": (cfg.block_size, C),
        "transformer.ln_f.weight": (C,),
    }
    if cfg.bias:
        shapes["transformer.ln_f.bias"] = (C,)
    for i in range(cfg.n_layer):
        h = f"transformer.h.{i}."
        layer = {
            "ln_1.weight": (C,), "ln_2.weight": (C,),
            "attn.c_attn.weight": (3 * C, C), "attn.c_proj.weight": (C, C),
            "mlp.c_fc.weight": (4 * C, C), "mlp.c_proj.weight": (C, 4 * C),
        }
        if cfg.bias:
            layer.update({
                "ln_1.bias": (C,), "ln_2.bias": (C,), "attn.c_attn.bias": (3 * C,),
                "attn.c_proj.bias": (C,), "mlp.c_fc.bias": (4 * C,), "mlp.c_proj.bias": (C,),
            })
        shapes.update({h + k: v for k, v in layer.items()})
    return shapes


def read_hf_tokenizer(path: str | Path, cfg: GPTConfig) -> dict[str, Any]:
    """The gptforge tokenizer dict for a HF directory: GPT-2 BPE, or a char vocabulary we exported.

    A directory that ships its own vocab.json is checked against GPT-2's, since gptforge can only
    tokenize with GPT-2's BPE (or a char vocabulary written by ``gptforge export --weights-only``).
    """
    p = Path(path)
    own = p / GPTFORGE_TOKENIZER_FILE
    if not own.is_file() and not (p / "vocab.json").is_file() and (p / BPE_FILE).is_file():
        return _bpe_of(p, cfg)  # a trained BPE, as gptforge export writes it
    if own.is_file():
        try:
            tok = json.loads(own.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise HFFormatError(f"{own} is corrupt ({e}): export the model again") from None
        if not isinstance(tok, dict) or "name" not in tok:
            raise HFFormatError(f"{own} is not a gptforge tokenizer: export the model again")
        return tok
    vocab_file = p / "vocab.json"
    if vocab_file.is_file():
        try:
            vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
            with open(gpt2_vocab_files()[1], encoding="utf-8") as f:
                gpt2_vocab = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise HFFormatError(f"{vocab_file} is not valid JSON ({e}): re-save the tokenizer") from None
        if vocab != gpt2_vocab:
            raise HFFormatError(
                f"{vocab_file} is not GPT-2's vocabulary: gptforge tokenizes with GPT-2 BPE only, "
                "so it cannot run this model's tokenizer"
            )
    if cfg.vocab_size == GPT2_CHAT_VOCAB_SIZE and _has_chat_template(p):
        return {"name": "gpt2", CHAT_RECORD_KEY: CHATML_TEMPLATE}  # GPT-2's grown for chat
    if cfg.vocab_size != GPT2_VOCAB_SIZE:
        raise HFFormatError(
            f"{p} has vocab_size {cfg.vocab_size}, not GPT-2's {GPT2_VOCAB_SIZE}, and no "
            f"{GPTFORGE_TOKENIZER_FILE}: gptforge cannot tell how to tokenize text for it"
        )
    return {"name": "gpt2"}


def _has_chat_template(p: Path) -> bool:
    """Whether a directory's tokenizer_config.json holds gptforge's ChatML template."""
    try:
        config = json.loads((p / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(config, dict) and config.get("chat_template") == CHATML_TEMPLATE


def _bpe_of(p: Path, cfg: GPTConfig) -> dict[str, Any]:
    try:
        tok = load_bpe(p)
    except GptforgeError as e:
        raise HFFormatError(str(e)) from None
    if tok.vocab_size != cfg.vocab_size:
        raise HFFormatError(f"{p / BPE_FILE} has {tok.vocab_size} tokens but the model's "
                            f"vocab_size is {cfg.vocab_size}: export the model again")
    return tok.to_dict()


def load_pretrained(path: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Read a Hugging Face GPT-2 directory: (model config, gptforge state dict, tokenizer dict).

    The state dict uses gptforge's names and nn.Linear layouts and leaves out ``lm_head.weight``
    (tied to ``transformer.wte.weight``); load it with ``model.load_state_dict(sd, strict=False)``
    after checking it covers every other key, or use ``checkpoint.load_model``. The config has
    ``dropout=0`` and ``bias=True`` (HF GPT-2 always has biases). Bad input raises HFFormatError
    (a GptforgeError) with one line saying what is wrong.
    """
    p = Path(path)
    if not p.is_dir():
        raise HFFormatError(f"{p} is not a directory: pass a Hugging Face GPT-2 directory")
    cfg = read_hf_config(p)
    tokenizer = read_hf_tokenizer(p, cfg)
    sd = hf_to_gptforge(_read_tensors(p), cfg, str(p))
    return cfg, sd, tokenizer


# ----------------------------------------------------------------------------------------------
# Writing


def gptforge_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """gptforge GPT -> the tensors ``GPT2LMHeadModel`` loads, keyed as ``save_pretrained`` writes them.

    Padded vocabulary rows are dropped (HF's vocab_size is the real one); a model trained with
    bias=False gets zero biases, which computes exactly the same (GPT2LMHeadModel always has
    biases); the tied matrix is stored once, as transformer.wte.weight, as transformers expects.
    """
    cfg = model.config
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items() if k != TIED_KEY}
    sd["transformer.wte.weight"] = sd["transformer.wte.weight"][: cfg.vocab_size]
    out: dict[str, torch.Tensor] = {}
    for name, shape in _expected_shapes(GPTConfig(**{**vars(cfg), "bias": True,
                                                     "pad_vocab_multiple": 1})).items():
        t = sd.get(name)
        if t is None:  # a bias of a bias=False model
            t = torch.zeros(shape)
        if name.endswith(CONV1D_SUFFIXES):
            t = t.t()  # nn.Linear (out, in) -> Conv1D (in, out)
        out[name] = t.contiguous()
    return out


def hf_config_dict(cfg: GPTConfig, eot: int | None, extra: dict[str, Any]) -> dict[str, Any]:
    """config.json for ``GPT2LMHeadModel``: GPT2Config's fields for this model (``eot``: the
    tokenizer's <|endoftext|> id, its bos and eos, if it has one)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,  # older transformers read the context length from n_ctx
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,  # 4 x n_embd
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "use_cache": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "gptforge": extra,
    }


def write_gpt2_tokenizer(out: Path, model_max_length: int, chat: bool = False) -> None:
    """GPT-2's tokenizer files: vocab.json and merges.txt are OpenAI's encoder.json and vocab.bpe;
    with ``chat``, ChatML's two tokens after <|endoftext|> and the chat template."""
    vocab_bpe, encoder_json = gpt2_vocab_files()
    shutil.copyfile(encoder_json, out / "vocab.json")
    shutil.copyfile(vocab_bpe, out / "merges.txt")
    special = {"bos_token": GPT2_EOT, "eos_token": GPT2_EOT, "unk_token": GPT2_EOT}
    _write_json(out / "special_tokens_map.json", special)
    extra: dict[str, Any] = {}
    if chat:
        extra["added_tokens_decoder"] = {
            str(i): {"content": t, "special": True, "normalized": False, "lstrip": False,
                     "rstrip": False, "single_word": False}
            for i, t in ((GPT2_EOT_ID, GPT2_EOT), (GPT2_IM_START_ID, IM_START),
                         (GPT2_IM_END_ID, IM_END))}
        extra["chat_template"] = CHATML_TEMPLATE
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model_max_length,
        "add_prefix_space": False,
        "errors": "replace",
        **special,
        **extra,
    })


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_hf_dir(
    out: Path, model: GPT, tokenizer: dict[str, Any], extra: dict[str, Any]
) -> list[str]:
    """Write an HF GPT-2 directory for ``model`` into ``out`` (which must exist and be empty).

    With GPT-2's tokenizer or a trained BPE, the tokenizer's files are written too (a BPE's
    tokenizer.json byte for byte, loaded by ``AutoTokenizer`` as a fast tokenizer); a char
    vocabulary is saved as gptforge_tokenizer.json (transformers cannot use it). Returns the
    files written.
    """
    name = tokenizer.get("name")
    eot = GPT2_EOT_ID if name == "gpt2" else tokenizer.get("eot_id") if name == "bpe" else None
    save_file(gptforge_to_hf(model), str(out / SAFETENSORS_FILE), metadata={"format": "pt"})
    _write_json(out / CONFIG_FILE, hf_config_dict(model.config, eot, extra))
    chat = tokenizer.get(CHAT_RECORD_KEY) is not None
    if chat:  # generate() stops at the end of a turn as at the end of text
        _write_json(out / GENERATION_CONFIG_FILE, {
            "bos_token_id": eot, "eos_token_id": sorted(stop_ids(tokenizer_from_dict(tokenizer))),
            "pad_token_id": eot})
    if name == "gpt2":
        write_gpt2_tokenizer(out, model.config.block_size, chat)
    elif name == "bpe":
        files = hf_tokenizer_files(tokenizer_from_dict(tokenizer),  # type: ignore[arg-type]
                                   model_max_length=model.config.block_size)
        for file, data in files.items():
            (out / file).write_bytes(data)
    else:
        _write_json(out / GPTFORGE_TOKENIZER_FILE, tokenizer)
    return sorted(os.listdir(out))
