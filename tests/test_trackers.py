"""Experiment trackers, offline and real: TensorBoard's event files, W&B in offline mode, MLflow in
a local file store, each read back and compared with metrics.jsonl; resume, failures, missing
packages."""

import errno
import json
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from test_train import quiet, run_cli, tiny_cfg

from gptforge.config import dotted_items
from gptforge.metrics import read_metrics, read_run_record
from gptforge.trackers import TRACKERS, Trackers, tracker_key
from gptforge.train import train

SRC = Path(__file__).resolve().parents[1] / "src"
ALL = ("train.tensorboard=true", "train.wandb=true", "train.mlflow=true")


@pytest.fixture
def offline(tmp_path, monkeypatch) -> str:
    """W&B offline and quiet, MLflow in a file store under tmp_path; returns the store's URI."""
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # gptforge opts in by itself
    return uri


def expected(run: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as each tracker should have it: {tracker key: [(step, value), ...]}."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in read_metrics(run / "metrics.jsonl"):
        for k, v in r.items():
            if k != "step":
                out.setdefault(tracker_key(k), []).append((r["step"], v))
    return out


def mlflow_runs(uri: str) -> tuple:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("gptforge")
    return client, client.search_runs([experiment.experiment_id])


def mlflow_history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def tensorboard_history(run: Path, key: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(key)]


def wandb_records(path: Path) -> list:
    """The records of a W&B run file: a 7-byte header (':W&B', magic, version), then LevelDB-log
    chunks (crc32, length, type) in 32 KiB blocks, each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # the block's zero padding
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def wandb_files(run: Path, run_id: str) -> list[Path]:
    """The offline files of a W&B run, oldest first (a session started in the same second as the
    one before gets its directory name with a -1 after the id)."""
    return sorted(run.glob(f"wandb/offline-run-*-{run_id}*/run-{run_id}.wandb"),
                  key=lambda p: p.stat().st_mtime_ns)


def wandb_run(path: Path) -> tuple:
    """(run record, {key: [(step, value)]}) of an offline W&B run file."""
    run, history = None, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                   for item in record.history.item}
            for k, v in row.items():
                if not k.startswith("_"):
                    history.setdefault(k, []).append((row["_step"], v))
    return run, history


def assert_same(got: list[tuple[int, float]], want: list[tuple[int, float]], rel: float = 0.0) -> None:
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=rel, abs=0)


def test_every_tracker_gets_metrics_jsonl_and_a_resume_continues_its_run(char_data, tmp_path, offline):
    for pkg in ("tensorboard", "wandb", "mlflow"):
        pytest.importorskip(pkg)
    run = tmp_path / "run"
    train(tiny_cfg(char_data, "train.max_steps=6", "train.log_interval=1", "train.eval_interval=3",
                   *ALL), run, log=quiet)
    want = expected(run)
    assert {"train/loss", "train/lr", "train/norm", "train/tok_per_s", "val/loss"} <= set(want)
    saved = read_run_record(run)["trackers"]
    assert set(saved) == {"tensorboard", "wandb", "mlflow"}

    # MLflow: one run in the experiment, the config as its parameters, every number at its step
    client, runs = mlflow_runs(offline)
    assert [r.info.run_id for r in runs] == [saved["mlflow"]["run_id"]]
    info = client.get_run(saved["mlflow"]["run_id"])
    assert info.info.status == "FINISHED" and info.info.run_name == "run"
    assert info.data.params["train.max_steps"] == "6"
    assert set(info.data.params) == set(dotted_items(tiny_cfg(char_data)))
    # what ran, not "auto": compile and dtype as resolved on this CPU
    assert info.data.params["train.compile"] == "False"
    assert info.data.params["train.dtype"] in ("float32", "bfloat16")
    for key, points in want.items():
        assert_same(mlflow_history(client, info.info.run_id, key), points)

    # W&B offline: its run file under RUN/wandb, with the config and the same history
    files = wandb_files(run, saved["wandb"]["id"])
    assert len(files) == 1
    wb_run, history = wandb_run(files[0])
    assert (wb_run.run_id, wb_run.project, wb_run.display_name) == (saved["wandb"]["id"], "gptforge", "run")
    config = {item.key: json.loads(item.value_json) for item in wb_run.config.update}
    assert config["train"]["max_steps"] == 6 and config["model"]["n_layer"] == 2
    assert config["train"]["compile"] is False and config["train"]["dtype"] != "auto"
    for key, points in want.items():
        assert_same(history[key], points)

    # TensorBoard: float32 scalars
    for key, points in want.items():
        assert_same(tensorboard_history(run, key), points, rel=1e-6)

    # Resume: the same MLflow and W&B runs go on, and hold the whole run once
    assert run_cli("train", "--out", str(run), "--resume", "--set", "train.max_steps=10") == 0
    want = expected(run)
    assert [s for s, _ in want["train/loss"]] == list(range(10))
    assert read_run_record(run)["trackers"] == saved
    client, runs = mlflow_runs(offline)
    assert len(runs) == 1 and client.get_run(runs[0].info.run_id).info.status == "FINISHED"
    for key, points in want.items():
        assert_same(mlflow_history(client, runs[0].info.run_id, key), points)
    files = wandb_files(run, saved["wandb"]["id"])
    assert len(files) == 2  # offline, a resumed W&B run is a second file under the same id
    assert_same(wandb_run(files[1])[1]["train/loss"], want["train/loss"][6:])
    for key, points in want.items():
        assert_same(tensorboard_history(run, key), points, rel=1e-6)


def test_hellaswag_and_every_number_reach_each_tracker_under_one_name(tmp_path, offline, char_data):
    for pkg in ("tensorboard", "wandb", "mlflow"):
        pytest.importorskip(pkg)
    cfg = tiny_cfg(char_data, *ALL, "train.run_name=hand")
    trackers = Trackers(cfg, tmp_path, saved={}, start_step=0, log=quiet)
    record = dict(step=3, loss=2.5, lr=1e-3, norm=0.5, dt_ms=4.0, tok_per_s=1e5, tokens=1024,
                  val_loss=2.75, val_bpb=1.125, hellaswag_acc=0.25, hellaswag_acc_norm=0.3125)
    trackers.log(**record)
    trackers.log(step=4, loss=float("nan"), val_loss="inf")  # not numbers: left out, as in plots
    trackers.close("finished")
    names = {k: tracker_key(k) for k in record if k != "step"}
    assert names["hellaswag_acc_norm"] == "hellaswag/acc_norm" and names["val_loss"] == "val/loss"
    assert names["val_bpb"] == "val/bpb"
    client, runs = mlflow_runs(offline)
    assert runs[0].info.run_name == "hand"
    wb = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    history = wandb_run(wb[0])[1]
    for key, name in names.items():
        assert mlflow_history(client, runs[0].info.run_id, name) == [(3, record[key])]
        assert history[name] == [(3, record[key])]
        assert tensorboard_history(tmp_path, name) == [(3, pytest.approx(record[key], rel=1e-6))]


@pytest.mark.parametrize("tracker", TRACKERS, ids=lambda t: t.name)
def test_a_missing_package_is_one_line_naming_the_extra(tracker, char_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, tracker.module, None)  # the import fails
    assert run_cli("train", "--data", str(char_data), "--out", str(tmp_path / "run"), "--preset",
                   "gpt2-tiny", "--set", "train.device=cpu", "--set", f"train.{tracker.name}=true") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"pip install 'gptforge[{tracker.name}]'" in err
    assert not (tmp_path / "run").exists()  # checked before the run directory is written


def test_a_failing_tracker_is_a_warning_and_training_goes_on(char_data, tmp_path, offline, monkeypatch):
    for pkg in ("tensorboard", "mlflow"):
        pytest.importorskip(pkg)
    from mlflow import MlflowClient

    # the server is down at the start
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.warns(UserWarning, match=r"MLflow could not start \(.*\): training goes on without MLflow"):
        result = train(tiny_cfg(char_data, "train.max_steps=4", "train.log_interval=1",
                                "train.tensorboard=true", "train.mlflow=true"), tmp_path / "down", log=quiet)
    assert result.step == 4 and read_run_record(tmp_path / "down")["status"] == "finished"
    assert "mlflow" not in read_run_record(tmp_path / "down")["trackers"]

    # the disk fills up in the middle of the run: one warning; the run, metrics.jsonl and the other
    # trackers carry on
    monkeypatch.setenv("MLFLOW_TRACKING_URI", offline)
    calls = []
    real = MlflowClient.log_batch

    def log_batch(self, run_id, metrics=(), *args, **kwargs):
        if metrics:
            calls.append(metrics[0].step)
            if len(calls) == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(tiny_cfg(char_data, "train.max_steps=8", "train.log_interval=1",
                                "train.tensorboard=true", "train.mlflow=true"), tmp_path / "full", log=quiet)
    messages = [str(w.message) for w in caught if "MLflow" in str(w.message)]
    assert messages == ["MLflow failed at step 2 (No space left on device): training goes on without MLflow"]
    assert calls == [0, 1, 2] and result.step == 8
    want = expected(tmp_path / "full")
    assert [s for s, _ in want["train/loss"]] == list(range(8))
    assert_same(tensorboard_history(tmp_path / "full", "train/loss"), want["train/loss"], rel=1e-6)
    client, runs = mlflow_runs(offline)
    assert [s for s, _ in mlflow_history(client, runs[0].info.run_id, "train/loss")] == [0, 1]
    assert runs[0].info.status == "FAILED"  # not left RUNNING: told when it failed


def test_no_tracker_is_imported_unless_asked(char_data, tmp_path):
    code = ("import sys; from gptforge.train import train; from gptforge.presets import resolve; "
            f"train(resolve('gpt2-tiny', None, ['data.path={char_data}', 'train.device=cpu', "
            "'train.max_steps=2']), sys.argv[1], log=lambda _: None); "
            "print([m for m in ('wandb', 'mlflow', 'tensorboard') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_restarted_run_gets_new_tracker_runs(char_data, tmp_path, offline, recwarn):
    """--resume auto starts over a run that never saved a checkpoint: its steps are gone from
    metrics.jsonl, so its tracker runs are left behind and new ones begin."""
    pytest.importorskip("mlflow")
    run = tmp_path / "run"
    (run / "wandb").mkdir(parents=True)  # what a start killed before its first save leaves
    (run / "metrics.jsonl").write_text('{"step": 0, "loss": 4.2}\n')
    (run / "run.json").write_text(json.dumps({"trackers": {"mlflow": {"run_id": "f" * 32}}}))
    assert run_cli("train", "--data", str(char_data), "--out", str(run), "--preset", "gpt2-tiny",
                   "--set", "train.device=cpu", "--set", "train.max_steps=3", "--set", "train.log_interval=1",
                   "--set", "train.mlflow=true", "--resume", "auto") == 0
    client, runs = mlflow_runs(offline)
    assert len(runs) == 1 and runs[0].info.run_id != "f" * 32
    assert read_run_record(run)["trackers"] == {"mlflow": {"run_id": runs[0].info.run_id, "tracking_uri": offline}}
    assert_same(mlflow_history(client, runs[0].info.run_id, "train/loss"), expected(run)["train/loss"])
    assert not [w for w in recwarn if "MLflow" in str(w.message)]


def test_a_restart_ends_the_tracker_run_it_abandons(char_data, tmp_path, offline):
    """The MLflow run of a start killed before its first checkpoint is marked KILLED when
    --resume auto starts the run again, instead of showing RUNNING for ever."""
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    with pytest.MonkeyPatch.context() as mp:  # the test's own client; gptforge opts in by itself
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=offline)
        experiment = client.create_experiment("gptforge")
        old = client.create_run(experiment).info.run_id
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0, "loss": 4.2}\n')
    (run / "run.json").write_text(json.dumps({"trackers": {"mlflow": {"run_id": old, "tracking_uri": offline}}}))
    assert run_cli("train", "--data", str(char_data), "--out", str(run), "--preset", "gpt2-tiny",
                   "--set", "train.device=cpu", "--set", "train.max_steps=2",
                   "--set", "train.mlflow=true", "--resume", "auto") == 0
    status = {r.info.run_id: r.info.status for r in mlflow_runs(offline)[1]}
    assert status.pop(old) == "KILLED" and list(status.values()) == ["FINISHED"]


def test_wandb_honours_wandb_dir(char_data, tmp_path, offline):
    """W&B's own convention: WANDB_DIR, when set, is where its files go (a process of its own:
    W&B reads its environment once per process)."""
    pytest.importorskip("wandb")
    (tmp_path / "elsewhere").mkdir()
    env = {**os.environ, "PYTHONPATH": str(SRC), "WANDB_DIR": str(tmp_path / "elsewhere")}
    out = subprocess.run([sys.executable, "-m", "gptforge", "train", "--data", str(char_data), "--out",
                          str(tmp_path / "run"), "--preset", "gpt2-tiny", "--set", "train.device=cpu",
                          "--set", "train.max_steps=2", "--set", "train.wandb=true"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    run_id = read_run_record(tmp_path / "run")["trackers"]["wandb"]["id"]
    assert list((tmp_path / "elsewhere").glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert not (tmp_path / "run" / "wandb").exists()
