"""HellaSwag: known answers by hand, agreement with transformers, the download, the CLI, bad input
in one line, and the score during training (one process and DDP with gloo)."""

import dataclasses
import hashlib
import json
import math
import os
import random
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_data import _Server
from test_train import quiet, run_cli, shakespeare_head, tiny_cfg

from gptforge import GPT, GPTConfig
from gptforge import hellaswag as hs
from gptforge.checkpoint import load_model
from gptforge.data import prepare
from gptforge.hf import write_hf_dir
from gptforge.metrics import read_metrics
from gptforge.report import plot_panels, read_series
from gptforge.train import train

LN2 = math.log(2)
WORDS = ("the a man woman dog child runs jumps swims into water then he she they quickly slowly "
         "ball park car house sings dances paints wall kitchen table cuts onion knife bike road "
         "guitar plays smiles camera shows").split()


def example_dicts(n: int, seed: int, ctx_words=(3, 14), end_words=(1, 12)) -> list[dict]:
    """HellaSwag-format examples of random words (with the fields the real file carries)."""
    rng = random.Random(seed)

    def words(lo_hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(*lo_hi)))

    return [{"ind": i, "activity_label": "Testing", "ctx": words(ctx_words).capitalize() + ".",
             "endings": [words(end_words) + "." for _ in range(4)], "label": rng.randrange(4),
             "split": "val", "split_type": "indomain", "source_id": f"test~{i}"}
            for i in range(n)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_bpe(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.preset("gpt2-tiny", vocab_size=50257)).eval()


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2-BPE model (context 64) as a Hugging Face directory, no training needed."""
    d = tmp_path_factory.mktemp("hs") / "model"
    d.mkdir()
    write_hf_dir(d, tiny_bpe(), {"name": "gpt2"}, {})
    return d


# ----------------------------------------------------------------------------------------------
# Known answers


class Bigram(torch.nn.Module):
    """logits[t] = log P(next | token t): every token's loss is minus the log of a table entry."""

    def __init__(self, probs: list[list[float]]):
        super().__init__()
        table = torch.tensor(probs, dtype=torch.float64)
        assert torch.allclose(table.sum(1), torch.ones(len(probs), dtype=torch.float64))
        self.register_buffer("logp", table.log().float())

    def forward(self, idx):
        return self.logp[idx], None  # (B, T, V)


# P(next | previous), one row per previous token. After a 1 the next 0 costs 6 ln 2: if the
# padding (token 0) after a short row were scored, its loss would show it.
TABLE = [
    [1 / 8, 1 / 8, 1 / 4, 1 / 2],
    [1 / 64, 21 / 64, 21 / 64, 21 / 64],
    [1 / 6, 1 / 6, 1 / 2, 1 / 6],
    [21 / 64, 21 / 64, 21 / 64, 1 / 64],
]


def test_known_answer_where_acc_and_acc_norm_disagree():
    # ctx [3 0]; endings [1], [2 2 2], [3 3], [0 0], label 1 (the context's own loss never counts):
    #   summed: -ln 1/8 = 3 ln2;  -ln 1/4 - 2 ln 1/2 = 4 ln2;  -ln 1/2 - ln 1/64 = 7 ln2;  6 ln2
    #   mean:   3 ln2;            4/3 ln2;                     3.5 ln2;                   3 ln2
    # acc picks ending 0 (wrong), acc_norm ending 1 (right).
    disagree = hs.render([3, 0], [[1], [2, 2, 2], [3, 3], [0, 0]], label=1, block_size=16)
    # ctx [2]; endings [2] (ln 2), [0] (ln 6), [1 1] (ln 6 + ln 64/21), [3] (ln 6), label 0:
    # both pick ending 0 (right).
    agree = hs.render([2], [[2], [0], [1, 1], [3]], label=0, block_size=16)
    model = Bigram(TABLE)

    x, y = hs.collate([disagree])
    sums, counts = hs.ending_losses(model(x)[0], y)
    assert sums.tolist() == pytest.approx([3 * LN2, 4 * LN2, 7 * LN2, 6 * LN2], abs=1e-6)
    assert counts.tolist() == [1, 3, 2, 2]

    for batch_size in (1, 2):  # one example per pass, or both padded into one
        r = hs.score(model, [disagree, agree], batch_size=batch_size)
        assert (r.preds, r.preds_norm) == ([0, 0], [1, 0])
        assert (r.examples, r.correct, r.correct_norm) == (2, 1, 2)
        assert (r.acc, r.acc_norm) == (0.5, 1.0)
        assert r.tokens == (2 + 4 + 3 + 3) + (1 + 1 + 2 + 1)  # inputs: each row but its last token


def test_rows_are_cropped_from_the_left_to_fit_the_context():
    ctx, ends = [5, 6, 7, 8], [[1, 2], [3]]
    r = hs.render(ctx, ends, label=0, block_size=3)  # the model reads 3 tokens, predicts a 4th
    assert r.rows == ((7, 8, 1, 2), (6, 7, 8, 3)) and r.starts == (2, 3) and r.cropped == 2
    x, y = hs.collate([r])
    assert x.tolist() == [[7, 8, 1], [6, 7, 8]]
    assert y.tolist() == [[-1, 1, 2], [-1, -1, 3]]  # only the endings' tokens are targets
    # A context cropped away entirely: the ending's first token has nothing before it.
    r = hs.render(ctx, ends, label=0, block_size=1)
    assert r.rows == ((1, 2), (8, 3)) and r.starts == (0, 1)
    assert hs.collate([r])[1].tolist() == [[2], [3]]
    assert hs.render(ctx, ends, label=0, block_size=5).cropped == 0


def test_batching_and_padding_do_not_change_a_real_models_choices(tmp_path):
    model = tiny_bpe(1)
    items = hs.render_examples(
        [hs.parse_example(d, "x") for d in example_dicts(12, seed=3, ctx_words=(2, 70))], 64)
    assert sum(it.cropped for it in items) > 0  # some rows longer than the context
    one = hs.score(model, items, batch_size=1)
    for kw in (dict(batch_size=5), dict(batch_size=12), dict(batch_size=12, max_tokens=600)):
        r = hs.score(model, items, **kw)
        assert (r.preds, r.preds_norm, r.correct, r.correct_norm) == (
            one.preds, one.preds_norm, one.correct, one.correct_norm)
    batches = hs.make_batches(items, max_examples=12, max_tokens=600)
    assert len(batches) > 1 and sorted(i for b in batches for i in b) == list(range(12))
    assert all(len(b) * 4 * items[b[0]].length <= 600 or len(b) == 1 for b in batches)


# ----------------------------------------------------------------------------------------------
# Agreement with transformers


def test_same_predictions_as_transformers(bpe_dir, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    os.environ["HF_HUB_OFFLINE"] = "1"
    rows = example_dicts(24, seed=5)
    data = write_jsonl(tmp_path / "val.jsonl", rows)
    out = tmp_path / "result.json"
    assert run_cli("eval", "--task", "hellaswag", "--ckpt", str(bpe_dir), "--data", str(data),
                   "--batch-size", "3", "--device", "cpu", "--json", str(out)) == 0
    captured = capsys.readouterr()
    line, result = captured.out, json.loads(out.read_text())
    assert captured.err == ""  # no progress bar where stderr is not a terminal, nothing cropped
    assert line.count("\n") == 1 and line.startswith("hellaswag: acc ")
    assert f"acc_norm {result['acc_norm']:.4f}" in line and "24 examples" in line

    # Independently: transformers' tokenizer and model, one ending at a time, no padding.
    tok = transformers.AutoTokenizer.from_pretrained(bpe_dir)
    model = transformers.GPT2LMHeadModel.from_pretrained(bpe_dir).eval()
    preds, preds_norm = [], []
    for ex in rows:
        ctx = tok.encode(ex["ctx"])
        sums, means = [], []
        for end in ex["endings"]:
            ids = ctx + tok.encode(" " + end)
            assert len(ids) <= 65
            with torch.no_grad():
                logp = model(torch.tensor([ids[:-1]])).logits[0].log_softmax(-1)
            nll = -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])][len(ctx) - 1:]
            sums.append(nll.sum().item())
            means.append(nll.mean().item())
        preds.append(sums.index(min(sums)))
        preds_norm.append(means.index(min(means)))
    assert preds != preds_norm  # the file exercises both choices
    labels = [ex["label"] for ex in rows]
    assert (result["correct"], result["correct_norm"], result["examples"]) == (
        sum(p == y for p, y in zip(preds, labels)), sum(p == y for p, y in zip(preds_norm, labels)), 24)
    # ... and example by example, through the Python API
    gpt, _ = load_model(bpe_dir)
    items = hs.render_examples([hs.parse_example(d, "x") for d in rows], 64)
    r = hs.score(gpt, items, batch_size=3)
    assert (r.preds, r.preds_norm) == (preds, preds_norm)


def test_cropping_is_noted_in_one_line(bpe_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "long.jsonl", example_dicts(3, seed=4, ctx_words=(70, 80)))
    assert run_cli("eval", "--task", "hellaswag", "--ckpt", str(bpe_dir), "--data", str(data)) == 0
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 1 and "| 3 examples |" in captured.out
    assert captured.err == ("note: 12 of 12 rows (context + ending) were longer than the model's "
                            "context and were cropped from the left\n")


# ----------------------------------------------------------------------------------------------
# The download


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A HellaSwag-format file behind a local HTTP server, a fresh cache, no real network."""
    www = tmp_path / "www"
    www.mkdir()
    write_jsonl(www / "input.txt", example_dicts(6, seed=7))
    server = _Server(www)
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("GPTFORGE_HELLASWAG_URL", server.url)
    yield www / "input.txt", server
    server.stop()


def test_download_once_verify_and_reuse(served, bpe_dir, tmp_path, monkeypatch, capsys):
    path, server = served
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setattr(hs, "HELLASWAG_VAL", dataclasses.replace(hs.HELLASWAG_VAL, sha256=sha))
    out = tmp_path / "r.json"
    assert run_cli("eval", "--task", "hellaswag", "--ckpt", str(bpe_dir), "--json", str(out)) == 0
    cached = tmp_path / "cache" / "hellaswag" / "hellaswag_val.jsonl"
    assert cached.read_bytes() == path.read_bytes() and os.listdir(cached.parent) == [cached.name]
    assert json.loads(out.read_text())["data"] == str(cached)
    server.stop()  # from now on only the cache can answer
    assert run_cli("eval", "--task", "hellaswag", "--ckpt", str(bpe_dir), "--limit", "2") == 0
    assert "| 2 examples |" in capsys.readouterr().out


def test_download_with_the_wrong_checksum_is_not_kept(served, bpe_dir, tmp_path, capsys):
    # The real sha256 of the validation set: the served file is something else.
    assert run_cli("eval", "--task", "hellaswag", "--ckpt", str(bpe_dir)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sha256" in err and hs.HELLASWAG_VAL.sha256 in err
    assert not list((tmp_path / "cache").rglob("*.jsonl")) and not list((tmp_path / "cache").rglob("*.tmp"))


def test_network_failure_says_where_to_get_the_file(bpe_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GPTFORGE_HELLASWAG_URL", "http://127.0.0.1:1/hellaswag_val.jsonl")
    assert run_cli("eval", "--task", "hellaswag", "--ckpt", str(bpe_dir)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("gptforge eval: error: could not download HellaSwag validation set from "
                          "http://127.0.0.1:1/hellaswag_val.jsonl (")
    assert err.rstrip().endswith(f"download hellaswag_val.jsonl yourself from {hs.HELLASWAG_VAL.url} "
                                 "(or a mirror of it) and pass the file: --data hellaswag_val.jsonl")


# ----------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture(scope="module")
def char_run(char_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("hs-char") / "run"
    train(tiny_cfg(char_data, "train.max_steps=1"), run, log=quiet)
    return run


GOOD = example_dicts(1, seed=9)[0]


@pytest.mark.parametrize("content, words", [
    (None, "does not exist"),
    (json.dumps(GOOD) + "\n{\"ctx\": \"A man\", \"endings\": [\n", "line 2 is not valid JSON"),
    (json.dumps({**GOOD, "endings": GOOD["endings"][:3]}), "line 1: 3 endings, but a HellaSwag example has 4"),
    (json.dumps({**GOOD, "label": 4}), "line 1: label 4 is out of range: it must be 0 to 3"),
    (json.dumps({**GOOD, "label": -1}), "label -1 is out of range"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "label"}), "line 1: no 'label' field"),
    (json.dumps({**GOOD, "endings": "one ending"}), "'endings' must be a list of 4 strings"),
    (json.dumps({**GOOD, "ctx": ""}), "'ctx' must be a non-empty string"),
    (json.dumps([1, 2, 3]), "expected a JSON object"),
    ("\n\n", "holds no examples"),
    (b"\xff\xfe{}", "line 1 is not UTF-8"),
])
def test_bad_files_fail_in_one_line(bpe_dir, tmp_path, capsys, content, words):
    path = tmp_path / "bad.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    assert run_cli("eval", "--task", "hellaswag", "--ckpt", str(bpe_dir), "--data", str(path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gptforge eval: error:") and words in err, err
    if content is not None:
        assert str(path) in err


@pytest.mark.parametrize("args, words", [
    (["--task", "hellaswag", "--split", "train"], "--split applies to --task loss only"),
    (["--task", "hellaswag", "--seq-len", "16"], "--seq-len applies to --task loss only"),
    (["--task", "hellaswag", "--limit", "-1"], "--limit -1 is out of range"),
    (["--task", "hellaswag", "--batch-size", "0"], "--batch-size 0 is out of range"),
    (["--task", "loss"], "--data is required with --task loss"),
    (["--task", "loss", "--data", "x.txt", "--limit", "3"], "--limit applies to --task hellaswag only"),
])
def test_bad_options_fail_in_one_line(bpe_dir, tmp_path, capsys, args, words):
    data = write_jsonl(tmp_path / "ok.jsonl", [GOOD])
    if args[1] == "hellaswag":
        args = [*args, "--data", str(data)]
    assert run_cli("eval", "--ckpt", str(bpe_dir), *args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err


def test_a_char_vocabulary_lacking_a_character_is_refused(char_run, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, {**GOOD, "ctx": "A robot 🤖 waves."}])
    assert run_cli("eval", "--task", "hellaswag", "--ckpt", str(char_run), "--data", str(bad)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HellaSwag example 2 has the character '🤖' (U+1F916)" in err
    assert "cannot represent" in err and "--tokenizer gpt2 or bpe" in err
    # text the vocabulary holds is scored, as with any other tokenizer
    ok = write_jsonl(tmp_path / "ok.jsonl", [{**GOOD, "ctx": "To be, or not to be:",
                                              "endings": ["that is", "the question", "my lord",
                                                          "good night"], "label": 1}])
    assert run_cli("eval", "--task", "hellaswag", "--ckpt", str(char_run), "--data", str(ok),
                   "--device", "cpu") == 0
    assert "acc" in capsys.readouterr().out


def test_training_refuses_hellaswag_on_char_data_before_writing(char_data, tmp_path, capsys):
    run = tmp_path / "run"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**GOOD, "ctx": "Ünïcödé 🤖."}])
    assert run_cli("train", "--data", str(char_data), "--out", str(run), "--preset", "gpt2-tiny",
                   "--set", "train.device=cpu", "--set", "train.hellaswag_interval=2",
                   "--set", f"train.hellaswag_data={bad}") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "leave train.hellaswag_interval at 0" in err
    assert not run.exists()


# ----------------------------------------------------------------------------------------------
# During training


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory) -> tuple[Path, Path]:
    """GPT-2-BPE training data and a HellaSwag file whose longer rows overflow context 64."""
    root = tmp_path_factory.mktemp("hs-train")
    (root / "input.txt").write_text(shakespeare_head(3_000), encoding="utf-8")
    prepare([str(root / "input.txt")], str(root / "data"), tokenizer="gpt2", val_fraction=0.2,
            progress=False)
    return root / "data", write_jsonl(root / "hs.jsonl", example_dicts(10, seed=11, ctx_words=(2, 70)))


def score_checkpoint(run: Path, data: Path, batch_size: int = 8, seq_len: int = 32) -> hs.HellaSwagResult:
    """One process, the run's final weights, the batches the training loop makes."""
    model, _ = load_model(run)
    items = hs.render_examples(hs.read_examples(str(data)), model.config.block_size)
    return hs.score(model, items, batch_size=len(items), max_tokens=batch_size * seq_len)


def test_training_logs_hellaswag_and_runs_and_plot_show_it(bpe_data, tmp_path, capsys):
    data, hs_file = bpe_data
    cfg = tiny_cfg(data, "train.max_steps=3", "train.hellaswag_interval=2",
                   f"train.hellaswag_data={hs_file}", "train.log_interval=100")
    lines = []
    train(cfg, tmp_path / "run", log=lines.append)
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "hellaswag_acc" in r]
    assert [r["step"] for r in records] == [1, 2]  # every 2 steps, and at the end
    final = score_checkpoint(tmp_path / "run", hs_file)
    assert final.examples == 10 and final.cropped > 0
    assert (records[-1]["hellaswag_acc"], records[-1]["hellaswag_acc_norm"]) == (final.acc, final.acc_norm)
    assert any(f"step     2 | hellaswag acc: {final.acc:.4f} | acc_norm: {final.acc_norm:.4f}" in line
               for line in lines)

    assert run_cli("runs", str(tmp_path)) == 0
    table = capsys.readouterr().out.splitlines()
    assert "hellaswag" in table[0] and f"{final.acc_norm:.4f}" in table[2]
    pytest.importorskip("matplotlib")
    assert run_cli("plot", str(tmp_path / "run"), "--out", str(tmp_path / "p.png")) == 0
    learning, _ = plot_panels(read_series([tmp_path / "run"]))
    assert [p.title for p in learning][-1] == "HellaSwag acc_norm"


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
@pytest.mark.slow
def test_ddp_ranks_split_the_examples_and_sum_to_one_process(bpe_data, tmp_path):
    from test_distributed import gptforge

    data, hs_file = bpe_data
    out = gptforge("--out", str(tmp_path / "ddp"), "--data", str(data), "--preset", "gpt2-tiny",
                   "--set", "train.device=cpu", "--set", "train.dtype=float32",
                   "--set", "train.total_batch_tokens=512", "--set", "train.max_steps=2",
                   "--set", "train.hellaswag_interval=2", "--set", f"train.hellaswag_data={hs_file}",
                   nproc=2)
    (record,) = [r for r in read_metrics(tmp_path / "ddp" / "metrics.jsonl") if "hellaswag_acc" in r]
    one = score_checkpoint(tmp_path / "ddp", hs_file)
    assert len(hs.make_batches(hs.render_examples(hs.read_examples(str(hs_file)), 64), 10, 256)) > 2
    assert (record["hellaswag_acc"], record["hellaswag_acc_norm"]) == (one.acc, one.acc_norm)
    assert "(10 examples," in out.stdout  # both ranks' shares, summed
