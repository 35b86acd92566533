"""gptforge serve over HTTP: one real server process on 127.0.0.1, the openai client, a browser.

The model is a tiny char-level GPT with random weights (its text is gibberish, which is all these
tests need) and a context of 1,024, so that a long generation outlasts a disconnect.
"""

import functools
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from test_train import wait_for as wait_until

from gptforge import GPT, GPTConfig
from gptforge.checkpoint import save_checkpoint
from gptforge.cli import main
from gptforge.config import RunConfig

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

wait_for = functools.partial(wait_until, timeout=20, poll=0.02)  # a server answers within seconds

# Tiny Shakespeare's 65 characters: the vocabulary of the test model.
CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
BODY_LIMIT = 4096
MAX_BATCH = 8


def run_cli(*args: str) -> int:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    return e.value.code


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("serve") / "tiny-char"
    cfg = RunConfig()
    cfg.model = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=1024, vocab_size=len(CHARS),
                          pad_vocab_multiple=1)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    save_checkpoint(run, model.state_dict(), None, cfg, {"name": "char", "chars": CHARS},
                    {"step": 0, "tokens": 0})
    return run


class Server:
    """A ``gptforge serve`` process and a small HTTP client for it."""

    def __init__(self, run: Path, log: Path, *extra: str):
        # One thread: a tiny model's kernels are faster without waking others (and CI is small).
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.log = log
        self.port = 0
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gptforge", "serve", "--ckpt", str(run), "--port", "0", *extra],
            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=env)

    def ready(self) -> "Server":
        """Wait for the start-up line that gives the port."""
        lines = []
        while not self.port:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.kill()
                raise AssertionError(f"the server did not start: {lines} {self.log.read_text()}")
            lines.append(line)
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            self.port = int(m.group(1)) if m else 0
        return self

    def conn(self, timeout: float = 60) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method: str, path: str, body=None) -> tuple[int, dict, dict]:
        """(status, JSON body, headers); ``body`` is JSON-encoded unless it is bytes."""
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        c = self.conn()
        c.request(method, path, body=body, headers={"content-type": "application/json"})
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, json.loads(data) if data.startswith((b"{", b"[")) else {"raw": data}, dict(r.getheaders())

    def complete(self, **body) -> dict:
        status, answer, _ = self.request("POST", "/v1/completions", body)
        assert status == 200, answer
        return answer

    def health(self) -> dict:
        return self.request("GET", "/health")[1]

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture(scope="module")
def servers(run_dir, tmp_path_factory):
    """Both servers this module uses, started together: their start-ups overlap."""
    logs = tmp_path_factory.mktemp("log")
    main = Server(run_dir, logs / "server.log", "--model-name", "tiny", "--max-batch",
                  str(MAX_BATCH), "--max-queue", "16", "--max-body-bytes", str(BODY_LIMIT))
    spare = Server(run_dir, logs / "spare.log", "--grace-s", "0")  # test_sigterm's to stop
    yield main, spare
    for s in (main, spare):
        s.stop()


@pytest.fixture(scope="module")
def server(servers) -> Server:
    return servers[0].ready()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """In-process sampling of a tiny model: one thread is faster than waking several."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def read_events(response: http.client.HTTPResponse) -> list:
    """Server-sent events until the stream ends: JSON objects, and "[DONE]"."""
    events = []
    for raw in response:
        line = raw.decode().rstrip("\n")
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def stream(server: Server, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    c = server.conn()
    c.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
              headers={"content-type": "application/json"})
    r = c.getresponse()
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
    return c, r


# ----------------------------------------------------------------------------------------------
# The API


def test_models_health_and_the_page(server):
    status, models, _ = server.request("GET", "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["tiny"]
    card = models["data"][0]
    assert card["context_length"] == 1024 and card["tokenizer"] == "char" and card["parameters"] > 0
    assert server.request("GET", "/v1/models/tiny")[1] == card
    assert server.health()["status"] == "ok"
    c = server.conn()
    c.request("GET", "/")
    r = c.getresponse()
    page = r.read().decode()
    assert r.status == 200 and "<textarea" in page and "/v1/completions" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing from the internet


def test_a_completion_streamed_and_not(server):
    whole = server.complete(prompt="ROMEO:", max_tokens=24, temperature=0)
    assert whole["object"] == "text_completion" and whole["model"] == "tiny"
    [choice] = whole["choices"]
    assert choice["finish_reason"] == "length" and len(choice["text"]) == 24
    assert whole["usage"] == {"prompt_tokens": 6, "completion_tokens": 24, "total_tokens": 30}
    c, r = stream(server, {"prompt": "ROMEO:", "max_tokens": 24, "temperature": 0,
                           "stream_options": {"include_usage": True}})
    events = read_events(r)
    c.close()
    assert events[-1] == "[DONE]" and events[-2]["usage"] == whole["usage"]
    chunks = events[:-2]
    assert "".join(e["choices"][0]["text"] for e in chunks) == choice["text"]
    assert len(chunks) > 2 and chunks[-1]["choices"][0]["finish_reason"] == "length"
    both = server.complete(prompt=["ROMEO:", "JULIET:"], n=2, max_tokens=8, temperature=0, echo=True)
    texts = [c["text"] for c in both["choices"]]
    assert [c["index"] for c in both["choices"]] == [0, 1, 2, 3]
    assert texts[0] == texts[1] == "ROMEO:" + choice["text"][:8] and texts[2].startswith("JULIET:")
    assert both["usage"]["prompt_tokens"] == 6 + 7


def test_greedy_is_what_gptforge_sample_prints(server, run_dir, capsys):
    for prompt in ["ROMEO:", "First Citizen:\nBefore we proceed any further, hear me speak."]:
        assert run_cli("sample", "--ckpt", str(run_dir), "--prompt", prompt, "--max-new-tokens", "60",
                       "--top-k", "1", "--device", "cpu") == 0
        printed = capsys.readouterr().out
        for greedy in ({"temperature": 0}, {"top_k": 1}):
            answer = server.complete(prompt=prompt, max_tokens=60, **greedy)
            assert printed == prompt + answer["choices"][0]["text"] + "\n"


def test_the_same_seed_gives_the_same_text(server, run_dir, capsys):
    body = {"prompt": "KING:", "max_tokens": 40, "temperature": 1.0, "seed": 7}
    a, b = (server.complete(**body)["choices"][0]["text"] for _ in range(2))
    other = server.complete(**{**body, "seed": 8})["choices"][0]["text"]
    assert a == b and a != other
    assert run_cli("sample", "--ckpt", str(run_dir), "--prompt", "KING:", "--max-new-tokens", "40",
                   "--seed", "7", "--device", "cpu") == 0
    assert capsys.readouterr().out == "KING:" + a + "\n"  # sample's seeds, too
    two = server.complete(**{**body, "n": 2})["choices"]
    assert [c["text"] for c in two] == [a, other]  # choice j is seed + j


WRONG_TYPES = {"prompt": 5, "model": 5, "max_tokens": "16", "temperature": "0.5", "top_p": True,
               "top_k": 1.5, "n": "1", "stream": "yes", "stream_options": 1, "stop": 3,
               "seed": "1", "echo": 1, "user": 1, "presence_penalty": "0",
               "frequency_penalty": [], "logit_bias": [], "logprobs": "1", "best_of": "1",
               "suffix": 1}

BAD_REQUESTS = [  # (body, status, part of the message)
    (b'{"prompt": "ROMEO:",', 400, "not valid JSON"),
    (b"", 400, "not valid JSON"),
    (b'\xff\xfe\x00{', 400, "not valid JSON"),
    (b'["ROMEO:"]', 400, "must be a JSON object"),
    (b'{"prompt": "ROMEO:", "temperature": NaN}', 400, "NaN is not a JSON number"),
    ({"prompt": "A" * (BODY_LIMIT + 10)}, 413, f"limit of {BODY_LIMIT:,} bytes"),
    ({}, 400, "prompt is required"),
    ({"prompt": ""}, 400, "prompt must be a non-empty string"),
    ({"prompt": []}, 400, "prompt must be a non-empty string"),
    ({"prompt": ["ROMEO:", ""]}, 400, "prompt must be a non-empty string"),
    ({"prompt": "ROMEO:", "max_tokens": -1}, 400, "max_tokens must be an integer >= 1, got -1"),
    ({"prompt": "ROMEO:", "max_tokens": 0}, 400, "max_tokens must be an integer >= 1"),
    ({"prompt": "ROMEO:", "max_tokens": 10**30}, 400, "more than the model's context of 1024"),
    ({"prompt": "ROMEO:", "temperature": -0.1}, 400, "temperature must be a number from 0 to 2"),
    ({"prompt": "ROMEO:", "temperature": 2.5}, 400, "temperature must be a number from 0 to 2"),
    ({"prompt": "ROMEO:", "top_p": 0}, 400, "top_p must be a number in (0, 1]"),
    ({"prompt": "ROMEO:", "top_p": 1.5}, 400, "top_p must be a number in (0, 1]"),
    ({"prompt": "ROMEO:", "top_k": -1}, 400, "top_k must be an integer >= 0"),
    ({"prompt": "ROMEO:", "n": 0}, 400, "n must be an integer >= 1"),
    ({"prompt": "ROMEO:", "n": MAX_BATCH + 1}, 400, f"--max-batch {MAX_BATCH}"),
    ({"prompt": "ROMEO:", "seed": -1}, 400, "seed must be an integer from 0"),
    ({"prompt": "ROMEO:", "seed": 2**64}, 400, "seed must be an integer from 0"),
    ({"prompt": "ROMEO:", "stop": ""}, 400, "stop must be a non-empty string"),
    ({"prompt": "ROMEO:", "stop": list("abcde")}, 400, "up to 4"),
    ({"prompt": "x" * 1500}, 400, "prompt has 1500 tokens"),
    ({"prompt": "x" * 1020, "max_tokens": 5}, 400, "1025 tokens, more than the model's context"),
    ({"prompt": "ROMEO: \u00e9t\u00e9"}, 400, "is not in the char vocabulary"),
    ({"prompt": ["ROMEO:", "\U0001F600"]}, 400, "prompt[1]: character"),
    ({"prompt": "ROMEO:", "model": "gpt-4"}, 404, "'gpt-4' does not exist here"),
    ({"prompt": "ROMEO:", "frequency_penalty": 0.5}, 400, "penalties are not supported"),
    ({"prompt": "ROMEO:", "logprobs": 2}, 400, "logprobs are not supported"),
    ({"prompt": "ROMEO:", "colour": "red"}, 400, "unknown field 'colour'"),
] + [({"prompt": "ROMEO:", name: value}, 400, f"{name} must be") if name != "prompt" else
     ({"prompt": value}, 400, "prompt must be") for name, value in WRONG_TYPES.items()]


def test_every_bad_request_gets_an_openai_error_and_the_server_carries_on(server):
    from gptforge.serve.protocol import CompletionRequest

    assert set(WRONG_TYPES) == set(CompletionRequest.model_fields)  # a wrong type in every field
    reference = server.complete(prompt="ROMEO:", max_tokens=24, temperature=0)["choices"]
    for body, status, message in BAD_REQUESTS:
        got, answer, _ = server.request("POST", "/v1/completions", body)
        assert got == status, (body, answer)
        assert set(answer) == {"error"} and message in answer["error"]["message"], (body, answer)
        assert answer["error"]["type"] == "invalid_request_error"
    for method, path, status, message in [
            ("POST", "/v1/chat/completions", 400, "base model"), ("GET", "/nope", 404, "no route"),
            ("PUT", "/v1/completions", 405, "does not take PUT"),
            ("GET", "/v1/models/gpt-4", 404, "does not exist")]:
        got, answer, _ = server.request(method, path, {"messages": []})
        assert got == status and message in answer["error"]["message"], answer
    assert server.complete(prompt="ROMEO:", max_tokens=24, temperature=0)["choices"] == reference
    health = server.health()
    assert health["status"] == "ok" and health["running"] == 0 and health["aborted"] == 0


def test_the_official_openai_client_works_unchanged(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused",
                           max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    reference = server.complete(prompt="ROMEO:", max_tokens=20, temperature=0)["choices"][0]["text"]
    done = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=20, temperature=0)
    assert done.choices[0].text == reference and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 20
    chunks = list(client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=20,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reference
    assert chunks[-1].usage.completion_tokens == 20
    stopped = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=20,
                                        temperature=0, stop=[reference[5:8]])
    assert stopped.choices[0].text == reference[:reference.index(reference[5:8])]
    assert stopped.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="max_tokens must be"):
        client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=-1)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="ROMEO:")
    with pytest.raises(openai.BadRequestError, match="base model"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])


# ----------------------------------------------------------------------------------------------
# Batching under load, disconnects, the queue


def test_a_client_that_disconnects_frees_its_row(server):
    before = server.health()
    c, r = stream(server, {"prompt": "ROMEO:", "max_tokens": 1000})
    r.readline()  # the first event: the request runs
    wait_for(lambda: server.health()["running"] == 1, "the row to run")
    c.sock.shutdown(socket.SHUT_RDWR)
    c.close()
    after = wait_for(lambda: (h := server.health())["running"] == 0 and h, "the row to be freed")
    assert after["cancelled"] == before["cancelled"] + 1 and after["served"] == before["served"]
    # A client waiting for a whole answer that goes away frees its row too.
    raw = socket.create_connection(("127.0.0.1", server.port))
    body = json.dumps({"prompt": "ROMEO:", "max_tokens": 1000}).encode()
    raw.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body))
    wait_for(lambda: server.health()["running"] == 1, "the second row to run")
    raw.close()
    after = wait_for(lambda: (h := server.health())["running"] == 0 and h, "the row to be freed")
    assert after["cancelled"] == before["cancelled"] + 2 and after["served"] == before["served"]


def one_client(server: Server, client: int, requests: int) -> list[str]:
    """Several requests in turn; for each, "ok" (a whole answer) or "busy" (a clear 503)."""
    outcomes = []
    for i in range(requests):
        body = {"prompt": ["ROMEO:", "KING RICHARD III:", "O"][client % 3], "max_tokens": 16,
                "temperature": 0.8, "seed": client * 100 + i}
        if (client + i) % 4 == 0:  # a quarter of them streamed
            c = server.conn()
            c.request("POST", "/v1/completions", json.dumps({**body, "stream": True}))
            r = c.getresponse()
            if r.status == 200:
                events = read_events(r)
                text = "".join(e["choices"][0]["text"] for e in events[:-1])
                assert events[-1] == "[DONE]" and len(text) == 16
                assert events[-2]["choices"][0]["finish_reason"] == "length"
                outcomes.append("ok")
            else:
                answer = json.loads(r.read())
                assert r.status == 503 and "busy" in answer["error"]["message"], answer
                outcomes.append("busy")
            c.close()
            continue
        status, answer, headers = server.request("POST", "/v1/completions", body)
        if status == 200:
            [choice] = answer["choices"]
            assert choice["finish_reason"] == "length" and len(choice["text"]) == 16
            assert answer["usage"]["completion_tokens"] == 16
            outcomes.append("ok")
        else:
            assert status == 503 and answer["error"]["type"] == "server_error", answer
            assert "busy" in answer["error"]["message"] and headers["retry-after"] == "1"
            outcomes.append("busy")
    return outcomes


def test_64_clients_get_whole_answers_or_clear_refusals_and_memory_settles(server):
    if not Path(f"/proc/{server.proc.pid}/status").is_file():
        pytest.skip("reads the server's memory from /proc (Linux)")

    def round_of(clients: int = 64, each: int = 3) -> list[str]:
        with ThreadPoolExecutor(clients) as pool:
            futures = [pool.submit(one_client, server, c, each) for c in range(clients)]
            return [o for f in futures for o in f.result(timeout=120)]

    first = round_of()
    assert len(first) == 64 * 3 and first.count("ok") >= MAX_BATCH
    assert "busy" in first  # 8 rows and 16 waiting: the rest were refused at once
    settled = server.rss_mib()
    for _ in range(2):
        outcomes = round_of()
        assert set(outcomes) <= {"ok", "busy"} and outcomes.count("ok") >= MAX_BATCH
    grown = server.rss_mib() - settled
    health = server.health()
    assert health["running"] == 0 and health["waiting"] == 0 and health["aborted"] == 0
    assert grown < 5, f"the server's memory grew by {grown:.1f} MiB over two more rounds"


def test_a_full_queue_answers_503_at_once(run_dir):
    """In-process: an engine that is not stepping, its queue filled by hand."""
    from starlette.testclient import TestClient

    from gptforge.serve.app import build_app
    from gptforge.sampling import Sampling
    from gptforge.serve.engine import Job
    from gptforge.serve.options import ServeOptions
    from gptforge.serve.server import build_engine, model_info

    opts = ServeOptions(ckpt=str(run_dir), device="cpu", max_batch=1, max_queue=2)
    engine = build_engine(opts)
    for _ in range(2):
        engine.submit(Job([[0]], 1, Sampling(max_tokens=1), lambda e: None))
    client = TestClient(build_app(engine, model_info(engine, opts), engine.tok, BODY_LIMIT))
    r = client.post("/v1/completions", json={"prompt": "ROMEO:"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "2 requests are already waiting" in r.json()["error"]["message"]
    assert client.get("/health").json()["waiting"] == 2


# ----------------------------------------------------------------------------------------------
# Start-up and shutdown


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_a_port_in_use_is_one_line_and_exit_2(run_dir, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert run_cli("serve", "--ckpt", str(run_dir), "--port", str(port)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"port {port} on 127.0.0.1 is already in use" in err


@pytest.mark.parametrize("damage", ["missing", "corrupt", "unreadable"])
def test_a_bad_checkpoint_is_one_line_and_exit_2_before_the_port_opens(run_dir, tmp_path, damage,
                                                                       capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    weights = run / "checkpoints" / "step_0000000" / "model.safetensors"
    if damage == "missing":
        run = tmp_path / "nowhere"
    elif damage == "corrupt":
        weights.write_bytes(weights.read_bytes()[:-100] + b"\0" * 100)
    else:  # a directory where the file should be: unreadable even by root
        weights.unlink()
        weights.mkdir()
    port = free_port()
    assert run_cli("serve", "--ckpt", str(run), "--port", str(port)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("gptforge serve: error:")
    assert refused(port)
    assert run_cli("serve", "--ckpt", str(run_dir), "--port", "70000") == 2
    assert "--port 70000 is out of range" in capsys.readouterr().err


def test_sigterm_cancels_what_runs_and_exits_0(servers):
    s = servers[1].ready()
    try:
        c, r = stream(s, {"prompt": "ROMEO:", "max_tokens": 1000})
        r.readline()
        whole: list = []
        waiting = threading.Thread(target=lambda: whole.append(
            s.request("POST", "/v1/completions", {"prompt": "KING:", "max_tokens": 1000})))
        waiting.start()
        wait_for(lambda: s.health()["running"] == 2, "both requests to run")
        s.proc.send_signal(signal.SIGTERM)
        events = read_events(r)
        waiting.join(timeout=30)
    finally:
        code = s.stop()
    assert code == 0, s.log.read_text()
    assert "shutting down" in events[-1]["error"]["message"]  # the stream says why it ended
    status, answer, _ = whole[0]
    assert status == 503 and "shutting down" in answer["error"]["message"]
    assert s.proc.stdout.read().strip().endswith("gptforge serve: stopped")
    assert "Traceback" not in s.log.read_text() and refused(s.port)


# ----------------------------------------------------------------------------------------------
# The page, in a real browser


def chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("Debian's chromium and chromium-driver are not installed "
                    "(apt-get install chromium chromium-driver; .ci/run does)")
    pytest.importorskip("selenium", reason="selenium drives the browser (pip install selenium)")
    return browser, driver


def test_the_page_streams_text_in_a_real_browser(server, tmp_path):
    browser, driver_path = chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
                 "--window-size=1200,860"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(f"http://127.0.0.1:{server.port}/")
        wait = WebDriverWait(driver, 30, poll_frequency=0.1)
        wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny")
        assert driver.find_element(By.ID, "context").text == "1,024"
        prompt = driver.find_element(By.ID, "prompt")
        prompt.send_keys("ROMEO:")
        driver.find_element(By.ID, "stop_text").send_keys("zzz")
        driver.find_element(By.ID, "generate").click()
        output = driver.find_element(By.ID, "output")
        wait.until(lambda d: output.get_attribute("data-finish"))
        completion = driver.find_element(By.ID, "completion").text
        assert output.get_attribute("data-finish") == "length" and len(completion) > 0
        assert int(output.get_attribute("data-chunks")) > 1  # it came in pieces, as streamed
        assert "tokens/s" in driver.find_element(By.ID, "status").text
        driver.save_screenshot(str(tmp_path / "page.png"))
    finally:
        driver.quit()


def test_the_outbox_hands_a_burst_of_events_over_at_one_wake_up_in_order():
    import asyncio

    from gptforge.serve.app import _Outbox

    class Counting:  # the loop, counting the engine thread's wake-ups
        def __init__(self, loop):
            self.loop, self.calls = loop, 0

        def call_soon_threadsafe(self, fn):
            self.calls += 1
            self.loop.call_soon_threadsafe(fn)

    async def run() -> None:
        loop = Counting(asyncio.get_running_loop())
        box = _Outbox(loop)
        queues = [asyncio.Queue() for _ in range(3)]

        def engine(first: int) -> None:
            for i in range(first, first + 50):
                for q in queues:
                    box.put(q, i)

        for burst in range(2):
            t = threading.Thread(target=engine, args=(burst * 50,))
            t.start()
            t.join()  # the loop is held here, as when it is busy: the whole burst waits
            await asyncio.sleep(0.01)
            assert loop.calls == burst + 1
        for q in queues:
            assert [q.get_nowait() for _ in range(100)] == list(range(100)) and q.empty()

    asyncio.run(run())
