"""Proof that ``gptforge export --format gguf`` runs in llama.cpp as it runs in gptforge.

    pip install llama-cpp-python    # builds llama.cpp: minutes on 2 cores
    python benchmarks/llamacpp_check.py --out /tmp/llamacpp [--ckpt RUN ...]

Outside the test suite because building llama.cpp takes minutes. For each model (by default two
made here with random weights: a chat model on GPT-2's BPE grown by the ChatML tokens, and a chat
model on a BPE trained on Tiny Shakespeare; ``--ckpt`` adds runs of yours), it exports the GGUF
and checks, through llama-cpp-python:

- tokenization: llama.cpp's ids equal gptforge's on mixed-script text (English, accents, Chinese,
  Korean, Arabic, Hindi, emoji with a skin tone, combining marks, control characters, runs of
  spaces and newlines, and the text of special tokens, which both must keep as text);
- logits: llama.cpp's for every position of a prompt against gptforge's (max |difference|; not
  exactly equal: ggml's CPU GELU reads a float16 lookup table, GGML_GELU_FP16 in its
  ggml-cpu/vec.h, about 1e-3 relative);
- greedy tokens: 24 tokens decoded greedily by each, compared;
- chat formatting: the prompt llama.cpp's chat handler renders from the GGUF's template
  (llama-cpp-python's Jinja2ChatFormatter, what ``create_chat_completion`` uses), tokenized with
  special tokens, equals gptforge's ``prompt_ids``; and llama.cpp's own C template engine
  (``llama_chat_apply_template``, which recognises ChatML) renders the same text.

Prints one line per check and writes OUT/llamacpp_check.json.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import sys
from pathlib import Path

import numpy as np

from machine import cpu

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

TEXTS = [
    "Hello, world! It's 3.14 -- isn't it?",
    "naïve café déjà vu, Ångström, ß and œ",
    "中文字符与标点：你好，世界！ 한국어 텍스트 العربية हिन्दी",
    "emoji 🤖🎉👍🏽 and e\u0301 (combining)  tabs\tand\n\nnewlines   and   spaces  ",
    "code: def f(x):\n    return x**2  # ok\r\n\x00\x1f\x7f",
    "the text <|im_start|>user and <|im_end|> and <|endoftext|> stays text",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello there: 中文 and émoji 🤖"},
    {"role": "assistant", "content": " Hi."},
    {"role": "user", "content": "  Two leading spaces\nand a second line."},
]


def made_models(out: Path) -> list[Path]:
    """Two random-weight chat models: GPT-2's BPE with ChatML, and a trained BPE."""
    import torch

    from gptforge import GPT, GPTConfig
    from gptforge.checkpoint import save_checkpoint
    from gptforge.config import RunConfig
    from gptforge.data.named import bundled_path
    from gptforge.tokenizer import GPT2Tokenizer, train_bpe

    text = Path(bundled_path("shakespeare")).read_text(encoding="utf-8")
    runs = []
    for name, tok in (("gpt2-chat", GPT2Tokenizer(chat=True)),
                      ("bpe-chat", train_bpe([text], 4096))):
        cfg = RunConfig()
        cfg.model = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=128,
                              vocab_size=tok.vocab_size, pad_vocab_multiple=1)
        torch.manual_seed(0)
        model = GPT(cfg.model)
        with torch.no_grad():  # larger weights than init's: logits that differ between tokens
            for p in model.parameters():
                p.mul_(4.0)
        save_checkpoint(out / name, model.state_dict(), None, cfg, tok.to_dict(),
                        {"step": 0, "tokens": 0})
        runs.append(out / name)
    return runs


def c_template(llm, messages: list[dict[str, str]]) -> str:  # noqa: ANN001
    """llama.cpp's own chat template engine on the GGUF's template (ChatML is one it knows)."""
    import llama_cpp

    template = llm.metadata["tokenizer.chat_template"].encode()
    chat = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages])
    buf = ctypes.create_string_buffer(8192)
    n = llama_cpp.llama_chat_apply_template(template, chat, len(messages), True, buf, len(buf))
    return buf.raw[:n].decode()


def check(run: Path, out: Path) -> dict:
    import torch
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from gptforge.checkpoint import load_model
    from gptforge.export import export_gguf
    from gptforge.tokenizer import prompt_ids, tokenizer_from_dict

    path = out / f"{run.name}.gguf"
    export_gguf(run, path, force=True)
    model, record = load_model(run)
    tok = tokenizer_from_dict(record)
    llm = Llama(str(path), n_ctx=model.config.block_size, logits_all=True, verbose=False)
    result: dict = {"model": run.name, "vocab": tok.vocab_size, "gguf_bytes": path.stat().st_size}

    mismatched = [t for t in TEXTS if llm.tokenize(t.encode(), add_bos=False, special=False) != tok.encode(t)]
    result["tokenization_equal"] = f"{len(TEXTS) - len(mismatched)}/{len(TEXTS)} texts"
    result["tokenization_mismatches"] = mismatched

    ids = tok.encode(TEXTS[2] + " " + TEXTS[0])[: model.config.block_size // 2]
    llm.reset()
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)], dtype=np.float64)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].double().numpy()
    result["logits_max_abs_diff"] = float(np.abs(theirs - ours).max())
    result["logits_max_abs"] = float(np.abs(ours).max())

    def greedy_llama(prompt: list[int], n: int) -> list[int]:
        llm.reset()
        llm.eval(prompt)
        got = []
        for _ in range(n):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            got.append(nxt)
            llm.eval([nxt])
        return got

    def greedy_ours(prompt: list[int], n: int) -> list[int]:
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(n):
                seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
        return seq[len(prompt):]

    a, b = greedy_llama(ids, 24), greedy_ours(ids, 24)
    result["greedy_tokens_equal"] = a == b
    result["greedy_tokens"] = a

    template = llm.metadata["tokenizer.chat_template"]
    formatter = Jinja2ChatFormatter(template, eos_token="<|im_end|>", bos_token="<|endoftext|>")
    text = formatter(messages=MESSAGES).prompt
    mine = prompt_ids(tok, MESSAGES)
    result["chat_template_ids_equal"] = llm.tokenize(text.encode(), add_bos=False, special=True) == mine
    try:
        result["chat_c_template_text_equal"] = c_template(llm, MESSAGES) == tok.decode(mine)
    except (AttributeError, KeyError, TypeError) as e:  # an older binding without the C call
        result["chat_c_template_text_equal"] = f"not run ({type(e).__name__}: {e})"
    result["eos_is_im_end"] = llm.token_eos() == getattr(tok, "im_end_id", None)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--ckpt", action="append", default=[], type=Path,
                    help="also check this chat run (repeatable)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import llama_cpp

    results = [check(run, args.out) for run in [*made_models(args.out), *args.ckpt]]
    for r in results:
        print(json.dumps({k: v for k, v in r.items() if k != "greedy_tokens"}))
    record = {"machine": cpu(), "date": str(datetime.date.today()),
              "llama_cpp_python": llama_cpp.__version__, "results": results}
    (args.out / "llamacpp_check.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    ok = all(not r["tokenization_mismatches"] and r["greedy_tokens_equal"]
             and r["chat_template_ids_equal"] for r in results)
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
