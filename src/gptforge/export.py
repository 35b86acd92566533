"""``gptforge export``: a checkpoint -> a directory ``transformers`` loads offline, or (``--format
gguf``) one GGUF file llama.cpp runs (llamacpp.py).

    GPT2LMHeadModel.from_pretrained(DIR) and AutoTokenizer.from_pretrained(DIR) both work on
    the result; the file conversion itself lives in hf.py and needs no transformers.

The directory is written under a temporary name beside ``--out`` and renamed into place, so an
interrupted export leaves nothing half-written, and an existing non-empty ``--out`` is replaced
only with ``force``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from gptforge.atomic import replacing
from gptforge.checkpoint import load_model
from gptforge.errors import GptforgeError
from gptforge.hf import GPTFORGE_TOKENIZER_FILE, write_hf_dir
from gptforge.llamacpp import write_gguf
from gptforge.model import GPT
from gptforge.tokenizer import GPT2_VOCAB_SIZE, tokenizer_from_dict
from gptforge.version import __version__

WEIGHTS_ONLY_README = """\
Exported by gptforge {version} from {source} with --weights-only.

This model was trained with gptforge's character-level tokenizer ({vocab} symbols). Hugging
Face's GPT-2 tokenizer cannot represent that vocabulary, so no tokenizer files are here:
transformers.GPT2LMHeadModel.from_pretrained(this directory) loads the weights, but text must be
turned into ids by hand. {tokfile} holds the vocabulary: its "chars" string lists the characters
in id order (token id i is chars[i]), e.g.

    import json
    chars = json.load(open("{tokfile}", encoding="utf-8"))["chars"]
    ids = [chars.index(c) for c in "some text"]
    text = "".join(chars[i] for i in ids)

gptforge itself reads this directory with its tokenizer: gptforge sample --ckpt <this directory>
"""


@dataclass
class ExportResult:
    path: Path
    files: list[str]
    notes: list[str] = field(default_factory=list)  # what the export changed, for the user


def _check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise GptforgeError(f"--out {out} is a file: give a directory path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise GptforgeError(
            f"--out {out} already holds files: pass --force to replace them, or choose another --out"
        )


def _notes(model: GPT) -> list[str]:
    cfg = model.config
    notes = []
    if not cfg.bias:
        notes.append("the model has no biases; zero biases were written, because GPT2LMHeadModel "
                     "always has them (this computes exactly the same)")
    if cfg.padded_vocab_size != cfg.vocab_size:
        notes.append(f"{cfg.padded_vocab_size - cfg.vocab_size} padded vocabulary rows were "
                     f"dropped (vocab_size {cfg.vocab_size})")
    return notes


def export_hf(
    ckpt_path: str | Path, out: str | Path, force: bool = False, weights_only: bool = False
) -> ExportResult:
    """Write the model at ``ckpt_path`` (run or checkpoint directory) as a Hugging Face GPT-2
    directory at ``out``. A char-level model is refused unless ``weights_only``."""
    out = Path(out)
    _check_out_dir(out, force)
    model, tokenizer = load_model(ckpt_path, verify="sha256")
    gpt2 = tokenizer.get("name") == "gpt2"
    has_hf_tokenizer = tokenizer.get("name") in ("gpt2", "bpe")
    if not has_hf_tokenizer and not weights_only:
        raise GptforgeError(
            f"{ckpt_path} uses the {tokenizer.get('name')} tokenizer ({model.config.vocab_size} "
            "symbols), which Hugging Face's GPT-2 tokenizer cannot represent (the weights would load "
            "but text would be tokenized wrongly): pass --weights-only to export the weights with "
            f"the vocabulary in {GPTFORGE_TOKENIZER_FILE}"
        )
    if gpt2 and model.config.vocab_size != tokenizer_from_dict(tokenizer).vocab_size:
        raise GptforgeError(
            f"{ckpt_path} has vocab_size {model.config.vocab_size} but its GPT-2 tokenizer has "
            f"{tokenizer_from_dict(tokenizer).vocab_size} tokens (GPT-2's {GPT2_VOCAB_SIZE:,}, "
            "with chat tokens 2 more): it cannot be exported with GPT-2's tokenizer files"
        )
    notes = _notes(model)
    extra = {"exported_by": f"gptforge {__version__}", "source": str(ckpt_path),
             "bias": model.config.bias}

    out.parent.mkdir(parents=True, exist_ok=True)
    with replacing(out, directory=True, tmp=out.parent / f".{out.name}.tmp-{os.getpid()}",
                   old=out.parent / f".{out.name}.old-{os.getpid()}") as tmp:
        write_hf_dir(tmp, model, tokenizer, extra)
        if not has_hf_tokenizer:
            (tmp / "README.txt").write_text(WEIGHTS_ONLY_README.format(
                version=__version__, source=ckpt_path, vocab=model.config.vocab_size,
                tokfile=GPTFORGE_TOKENIZER_FILE), encoding="utf-8")
            notes.append(f"weights only: the {tokenizer.get('name')} vocabulary is in "
                         f"{GPTFORGE_TOKENIZER_FILE} (see README.txt); transformers has no "
                         "tokenizer for it")
    return ExportResult(out, sorted(p.name for p in out.iterdir()), notes)


def export_gguf(ckpt_path: str | Path, out: str | Path, force: bool = False) -> ExportResult:
    """Write the model at ``ckpt_path`` as one GGUF file at ``out``: written under a temporary
    name beside it and renamed, so an interrupted export leaves nothing half-written."""
    out = Path(out)
    if out.is_dir():
        raise GptforgeError(f"--out {out} is a directory: give a file name such as model.gguf")
    if out.exists() and not force:
        raise GptforgeError(f"--out {out} already exists: pass --force to replace it, or choose "
                            "another --out")
    model, tokenizer = load_model(ckpt_path, verify="sha256")
    if tokenizer.get("name") not in ("gpt2", "bpe"):
        raise GptforgeError(f"{ckpt_path} uses the {tokenizer.get('name')} tokenizer, which GGUF "
                            "cannot hold (llama.cpp runs GPT-2's BPE and byte-level BPEs): "
                            "export it for transformers with --weights-only instead")
    notes = [n for n in _notes(model) if "biases" not in n]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        write_gguf(tmp, model, tokenizer, out.stem)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ExportResult(out, [out.name], notes)
