"""Hugging Face interop: transformers reads what `gptforge export` writes, gptforge reads what
`save_pretrained` writes, with the same logits and greedy tokens; bad directories fail in one line.

transformers is the independent implementation here (a test extra); tests that need it skip
without it. Nothing may download: HF_HUB_OFFLINE is set before transformers is imported.
"""

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train import quiet, run_cli, shakespeare_head, tiny_cfg

import gptforge
from gptforge import GPT, GPTConfig
from gptforge.checkpoint import CheckpointError, load_model, load_pretrained
from gptforge.data import prepare
from gptforge.generate import generate
from gptforge.hf import _expected_shapes, write_hf_dir
from gptforge.hf import load_pretrained as hf_load_pretrained
from gptforge.tokenizer import GPT2Tokenizer, tokenizer_from_dict
from gptforge.train import train

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
TOL = 1e-4


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(transformers, tmp_path_factory) -> Path:
    """A tiny GPT-2 made and saved by transformers itself."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257))
    with torch.no_grad():  # nonzero biases and LayerNorm affines, so every tensor is checked
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    d = tmp_path_factory.mktemp("hf") / "tiny"
    model.save_pretrained(d, safe_serialization=True)
    return d


def _run(tmp_path_factory, name: str, tokenizer: str, *extra: str) -> Path:
    root = tmp_path_factory.mktemp(name)
    src = root / "input.txt"
    src.write_text(shakespeare_head(6_000), encoding="utf-8")
    prepare([str(src)], str(root / "data"), tokenizer=tokenizer, val_fraction=0.1, progress=False)
    cfg = tiny_cfg(root / "data", "train.max_steps=3", "train.batch_size=2", "train.seq_len=32",
                   "train.total_batch_tokens=64", *extra)
    train(cfg, root / "run", log=quiet)
    return root / "run"


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory) -> Path:
    """A gptforge run with GPT-2 BPE, no biases and a padded vocabulary: the hard case."""
    return _run(tmp_path_factory, "bpe", "gpt2", "model.bias=false", "model.pad_vocab_multiple=64")


@pytest.fixture(scope="module")
def char_run(tmp_path_factory) -> Path:
    return _run(tmp_path_factory, "char", "char")


def hf_greedy(model, idx: torch.Tensor, n: int) -> list[int]:
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = model(idx).logits[0, -1].argmax()
            out.append(int(nxt))
            idx = torch.cat([idx, nxt.view(1, 1)], dim=1)
    return out


def assert_same_model(ours: GPT, theirs, vocab: int) -> None:
    torch.manual_seed(1)
    idx = torch.randint(0, vocab, (2, 24))
    with torch.no_grad():
        a, _ = ours(idx)
        b = theirs(idx).logits
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < TOL
    mine = generate(ours, idx[:1], 12, top_k=1)[0]
    assert mine == hf_greedy(theirs, idx[:1], 12)


# ----------------------------------------------------------------------------------------------
# Import: a Hugging Face directory -> gptforge


def test_load_a_transformers_directory(hf_dir, transformers):
    theirs = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    ours = gptforge.load(hf_dir)
    assert not ours.training
    assert ours.config.n_layer == 2 and ours.config.block_size == 64 and ours.config.bias
    assert_same_model(ours, theirs, 50257)


def test_load_pretrained_gives_config_state_and_tokenizer(hf_dir):
    cfg, sd, tok = hf_load_pretrained(hf_dir)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) == (2, 2, 32, 64, 50257)
    assert tok == {"name": "gpt2"}
    assert "lm_head.weight" not in sd
    model = GPT(cfg)
    expected = {k for k in model.state_dict() if k != "lm_head.weight"}
    assert set(sd) == expected
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (96, 32)  # nn.Linear layout
    # The dispatching loader gives the same for this directory, and for a gptforge checkpoint.
    cfg2, sd2, tok2 = load_pretrained(hf_dir)
    assert cfg2 == cfg and tok2 == tok and all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_load_pretrained_reads_gptforge_checkpoints_too(bpe_run):
    cfg, sd, tok = load_pretrained(bpe_run)
    model, tok2 = load_model(bpe_run)
    assert cfg == model.config and tok == tok2 == {"name": "gpt2"}
    assert "lm_head.weight" not in sd and set(sd) == set(model.state_dict()) - {"lm_head.weight"}


def test_expected_shapes_match_the_model():
    for bias in (True, False):
        cfg = GPTConfig.preset("gpt2-tiny", vocab_size=50, bias=bias, pad_vocab_multiple=64)
        sd = GPT(cfg).state_dict()
        assert _expected_shapes(cfg) == {k: tuple(v.shape) for k, v in sd.items() if k != "lm_head.weight"}


def test_pytorch_model_bin_loads_weights_only(hf_dir, tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(hf_dir / "config.json", d)
    sd = load_file(str(hf_dir / "model.safetensors"))
    torch.save({k[len("transformer."):]: v for k, v in sd.items()}, d / "pytorch_model.bin")  # GPT2Model keys
    a = gptforge.load(d)
    b = gptforge.load(hf_dir)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_sharded_safetensors_load(hf_dir, tmp_path):
    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(hf_dir / "config.json", d)
    sd = load_file(str(hf_dir / "model.safetensors"))
    keys = sorted(sd)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(d / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a, b = gptforge.load(d).state_dict(), gptforge.load(hf_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


class Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def bad_dir(tmp_path: Path, hf_dir: Path, kind: str) -> Path:
    d = tmp_path / kind
    d.mkdir()
    cfg = json.loads((hf_dir / "config.json").read_text())
    if kind == "not-gpt2":
        (d / "notes.txt").write_text("hello")
        return d
    if kind == "model-type":
        cfg["model_type"] = "llama"
    if kind == "shape":
        cfg["n_embd"] = 64
    if kind == "variant":
        cfg["activation_function"] = "relu"
    (d / "config.json").write_text(json.dumps(cfg))
    if kind in ("model-type", "shape", "variant", "vocab"):
        shutil.copy(hf_dir / "model.safetensors", d)
    if kind == "vocab":
        (d / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    if kind == "pickle":
        with open(d / "pytorch_model.bin", "wb") as f:
            pickle.dump({"x": Boom()}, f, protocol=2)
    if kind == "truncated":
        (d / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes()[:1000])
    if kind == "missing-tensor":
        sd = load_file(str(hf_dir / "model.safetensors"))
        del sd["transformer.h.1.mlp.c_fc.bias"]
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


@pytest.mark.parametrize("kind, words", [
    ("not-gpt2", "no complete checkpoint"),
    ("model-type", "model_type 'llama'"),
    ("missing", "no weights"),
    ("shape", "shape"),
    ("variant", "activation_function='relu'"),
    ("vocab", "not GPT-2's vocabulary"),
    ("pickle", "cannot be loaded safely"),
    ("truncated", "corrupt or truncated"),
    ("missing-tensor", "lacks 1 weights (first: transformer.h.1.mlp.c_fc.bias)"),
])
def test_bad_directories_fail_in_one_line(hf_dir, tmp_path, capsys, kind, words):
    d = bad_dir(tmp_path, hf_dir, kind)
    with pytest.raises(CheckpointError, match=words.replace("(", r"\(").replace(")", r"\)")):
        gptforge.load(d)
    assert run_cli("sample", "--ckpt", str(d), "--max-new-tokens", "2") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gptforge sample: error:") and words in err


# ----------------------------------------------------------------------------------------------
# Export: a gptforge checkpoint -> a Hugging Face directory


def test_export_loads_in_transformers_with_same_logits_and_tokens(bpe_run, tmp_path, transformers, capsys):
    out = tmp_path / "hf"
    assert run_cli("export", "--ckpt", str(bpe_run), "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "zero biases" in printed and "47 padded vocabulary rows" in printed
    assert sorted(os.listdir(out)) == ["config.json", "merges.txt", "model.safetensors",
                                       "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    cfg = json.loads((out / "config.json").read_text())
    assert {k: cfg[k] for k in ("model_type", "activation_function", "layer_norm_epsilon",
                                "bos_token_id", "eos_token_id", "tie_word_embeddings",
                                "vocab_size", "n_positions", "n_ctx", "n_layer", "n_head", "n_embd")} == {
        "model_type": "gpt2", "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": True,
        "vocab_size": 50257, "n_positions": 64, "n_ctx": 64, "n_layer": 2, "n_head": 2, "n_embd": 32}
    assert cfg["architectures"] == ["GPT2LMHeadModel"]
    tensors = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in tensors
    assert tensors["transformer.wte.weight"].shape == (50257, 32)  # padded rows dropped
    assert tensors["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D layout
    assert not tensors["transformer.h.0.mlp.c_fc.bias"].any()  # bias=False -> zeros

    theirs, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ours = gptforge.load(bpe_run)
    assert_same_model(ours, theirs.eval(), 50257)

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "First Citizen:\nBefore we proceed, café 😀 any further!"
    assert hf_tok(text)["input_ids"] == GPT2Tokenizer().encode(text)
    assert hf_tok.eos_token_id == 50256

    # ... and back: the exported directory loads into gptforge as the same function.
    again = gptforge.load(out)
    idx = torch.randint(0, 50257, (1, 16))
    with torch.no_grad():
        assert (again(idx)[0] - ours(idx)[0]).abs().max().item() < TOL


def test_export_refuses_char_models_unless_weights_only(char_run, tmp_path, transformers, capsys):
    out = tmp_path / "hf"
    assert run_cli("export", "--ckpt", str(char_run), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "char tokenizer" in err and "--weights-only" in err
    assert not out.exists()

    assert run_cli("export", "--ckpt", str(char_run), "--out", str(out), "--weights-only") == 0
    assert "gptforge_tokenizer.json" in capsys.readouterr().out
    files = sorted(os.listdir(out))
    assert files == ["README.txt", "config.json", "gptforge_tokenizer.json", "model.safetensors"]
    ours, tok = load_model(char_run)
    assert json.loads((out / "gptforge_tokenizer.json").read_text()) == tok
    readme = (out / "README.txt").read_text()
    assert "gptforge_tokenizer.json" in readme and "id order" in readme
    theirs = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert_same_model(ours, theirs, ours.config.vocab_size)
    # gptforge reads it back with its char vocabulary.
    _, tok2 = load_model(out)
    assert tok2 == tok
    assert tokenizer_from_dict(tok2).decode([0, 1]) == tok["chars"][:2]


def test_export_never_overwrites_without_force(bpe_run, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run_cli("export", "--ckpt", str(bpe_run), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err
    assert os.listdir(out) == ["keep.txt"]
    assert run_cli("export", "--ckpt", str(bpe_run), "--out", str(out), "--force") == 0
    assert "keep.txt" not in os.listdir(out) and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_sample_cli_reads_a_hf_directory(tmp_path, capsys):
    """A directory gptforge wrote with hf.write_hf_dir: no transformers needed."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("gpt2-tiny", vocab_size=50257))
    d = tmp_path / "hf"
    d.mkdir()
    write_hf_dir(d, model, {"name": "gpt2"}, {})
    assert run_cli("sample", "--ckpt", str(d), "--prompt", "Hello", "--max-new-tokens", "5",
                   "--top-k", "1") == 0
    out = capsys.readouterr().out
    tok = GPT2Tokenizer()
    ids = generate(model.eval(), torch.tensor([tok.encode("Hello")]), 5, top_k=1, stop_id=tok.eot_id)[0]
    assert out == "Hello" + tok.decode(ids) + "\n"
