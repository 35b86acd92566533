"""The serving engine without HTTP: continuous batching gives each row what it would get alone.

The steps are driven by hand (``engine.step()``), so the tests decide exactly when requests join
and leave. Equality with a lone run is checked in float64, where a batched matmul's rounding
cannot flip a token; the server's float32 path for a lone request is checked against
``gptforge sample`` in test_serve.py.
"""

import pytest
import torch

from gptforge import GPT, GPTConfig
from gptforge.generate import generate
from gptforge.sampling import Sampling as Params
from gptforge.serve.engine import Abort, End, Engine, Job, Overloaded, Text
from gptforge.tokenizer import CharTokenizer, GPT2Tokenizer

CHARS = "".join(chr(c) for c in range(32, 97))  # 65 symbols: text is one character per token


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is faster than waking several for each small kernel."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def char_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("gpt2-tiny", vocab_size=len(CHARS), block_size=128)).eval().double()


class Collect:
    """A job's events: text per choice, how each ended, aborts."""

    def __init__(self) -> None:
        self.text: dict[int, str] = {}
        self.ends: dict[int, End] = {}
        self.aborts: list[Abort] = []

    def __call__(self, event) -> None:
        if isinstance(event, Text):
            self.text[event.choice] = self.text.get(event.choice, "") + event.text
        elif isinstance(event, End):
            self.ends[event.choice] = event
        else:
            self.aborts.append(event)


def job(tok, prompts, params, n=1):
    out = Collect()
    return Job([tok.encode(p) for p in prompts], n, params, out), out


def run_alone(model, tok, prompt, params, n=1) -> Collect:
    engine = Engine(model, tok, torch.device("cpu"), max_batch=n, max_queue=1)
    j, out = job(tok, [prompt], params, n)
    engine.submit(j)
    while engine.step():
        pass
    return out


def test_rows_that_join_at_different_steps_get_what_each_gets_alone(char_model):
    tok = CharTokenizer(CHARS)
    requests = [  # (step it arrives at, prompt, settings): lengths, arrivals and settings differ
        (0, "HELLO", Params(max_tokens=30, temperature=0)),
        (0, "A LONGER PROMPT OF SEVERAL WORDS", Params(max_tokens=12, temperature=0.9, seed=5)),
        (3, "XY", Params(max_tokens=25, temperature=1.3, top_k=8, seed=11)),
        (7, "ONE MORE, JOINING LATE", Params(max_tokens=18, temperature=0.7, top_p=0.8, seed=2)),
        (7, "Q", Params(max_tokens=40, top_k=1)),
    ]
    engine = Engine(char_model, tok, torch.device("cpu"), max_batch=4, max_queue=8)
    jobs = []
    for step in range(200):
        for at, prompt, params in requests:
            if at == step:
                jobs.append(job(tok, [prompt], params))
                engine.submit(jobs[-1][0])
        if not engine.step() and step > 7:
            break
    assert engine.stats.peak_rows == 4  # the fifth waited for a free row (max_batch 4)
    for (_, prompt, params), (_, out) in zip(requests, jobs):
        alone = run_alone(char_model, tok, prompt, params)
        assert out.text == alone.text and out.ends == alone.ends
        assert out.ends[0] == End(0, "length", params.max_tokens)
        # ...and alone is generate's own sampling, the same seed drawn the same way
        gen = torch.Generator().manual_seed(params.seed or 0)
        ids = generate(char_model, torch.tensor([tok.encode(prompt)]), params.max_tokens,
                       params.temperature, params.top_k, gen, top_p=params.top_p)[0]
        if params.seed is not None or params.greedy:
            assert out.text[0] == tok.decode(ids)


def test_choices_are_seeded_one_apart_and_prompts_batch_without_changing_anything(char_model):
    tok = CharTokenizer(CHARS)
    params = Params(max_tokens=20, temperature=1.0, seed=40)
    engine = Engine(char_model, tok, torch.device("cpu"), max_batch=6, max_queue=4)
    j, out = job(tok, ["ABC", "ZZZZZZ"], params, n=3)
    engine.submit(j)
    while engine.step():
        pass
    assert sorted(out.ends) == list(range(6))
    for p, prompt in enumerate(["ABC", "ZZZZZZ"]):
        for c in range(3):
            alone = run_alone(char_model, tok, prompt, Params(max_tokens=20, seed=40 + c))
            assert out.text[p * 3 + c] == alone.text[0]
    assert len({out.text[c] for c in range(3)}) == 3  # three seeds, three texts


@pytest.mark.parametrize("settings", [
    [Params(max_tokens=25, temperature=0), Params(max_tokens=30, top_k=0, seed=3),
     Params(max_tokens=20, seed=4, stops=("E",)), Params(max_tokens=30, top_k=0, top_p=0.5, seed=5)],
    [Params(max_tokens=30, top_k=5, seed=6), Params(max_tokens=30, top_k=40, temperature=1.5, seed=7),
     Params(max_tokens=12, top_k=1), Params(max_tokens=30, top_k=20, top_p=0.9, seed=8)],
], ids=["some-rows-without-top-k", "every-row-with-top-k"])
def test_a_rows_tokens_do_not_depend_on_the_settings_beside_it(char_model, settings):
    """One sampling call takes the whole batch; each row's token still comes from its own
    logits, settings and seed (with no top-k in the batch every logit takes part; with top-k
    only the best of each row)."""
    tok = CharTokenizer(CHARS)
    prompts = ["ABC", "THE QUICK FOX", "HELLO THERE", "Z"]
    engine = Engine(char_model, tok, torch.device("cpu"), max_batch=4, max_queue=4)
    jobs = [job(tok, [p], params) for p, params in zip(prompts, settings)]
    for j, _ in jobs:
        engine.submit(j)
    while engine.step():
        pass
    assert engine.stats.peak_rows == 4
    for (_, out), prompt, params in zip(jobs, prompts, settings):
        alone = run_alone(char_model, tok, prompt, params)
        assert out.text == alone.text and out.ends == alone.ends
    reasons = {out.ends[0].reason for _, out in jobs}
    assert reasons <= {"stop", "length"} and "length" in reasons


def test_stop_strings_end_of_text_and_partial_characters():
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("gpt2-tiny", vocab_size=50257)).eval()
    tok = GPT2Tokenizer()
    greedy = run_alone(model, tok, "The", Params(max_tokens=20, temperature=0))
    full = greedy.text[0]
    assert greedy.ends[0] == End(0, "length", 20)
    stop = full[6:9]
    cut = run_alone(model, tok, "The", Params(max_tokens=20, temperature=0, stops=("zzz", stop)))
    assert cut.text.get(0, "") == full[: full.index(stop)] and cut.ends[0].reason == "stop"
    with torch.no_grad():  # make <|endoftext|> certain after anything
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.eot_id] = 1.0
        model.transformer.ln_f.bias.fill_(10.0)
    eot = run_alone(model, tok, "The", Params(max_tokens=20, temperature=1.0, seed=1))
    assert eot.text == {} and eot.ends[0] == End(0, "stop", 1)


def test_the_queue_is_bounded_and_refuses_at_once(char_model):
    tok = CharTokenizer(CHARS)
    engine = Engine(char_model, tok, torch.device("cpu"), max_batch=2, max_queue=2)
    for _ in range(2):
        engine.submit(job(tok, ["A"], Params(max_tokens=3))[0])
    with pytest.raises(Overloaded, match="max-queue"):
        engine.submit(job(tok, ["A"], Params(max_tokens=3))[0])
    assert engine.stats.rejected == 1 and engine.waiting == 2
    with pytest.raises(ValueError, match="1..2 rows"):
        engine.submit(job(tok, ["A", "B", "C"], Params(max_tokens=3))[0])
    while engine.step():
        pass
    assert engine.waiting == 0 and engine.stats.served == 2


def test_a_cancelled_job_frees_its_rows_and_the_others_carry_on(char_model):
    tok = CharTokenizer(CHARS)
    engine = Engine(char_model, tok, torch.device("cpu"), max_batch=3, max_queue=4)
    params = [Params(max_tokens=30, temperature=0.8, seed=s) for s in range(3)]
    jobs = [job(tok, [p], pa) for p, pa in zip(["FIRST", "SECOND ONE", "3"], params)]
    for j, _ in jobs:
        engine.submit(j)
    for _ in range(5):
        engine.step()
    assert engine.running == 3
    engine.cancel(jobs[0][0])  # row 0: the last row moves into its place
    engine.step()
    assert engine.running == 2 and engine.stats.cancelled == 1
    waiting, out4 = job(tok, ["LATE"], Params(max_tokens=10, temperature=0))
    engine.submit(waiting)
    engine.cancel(waiting)  # a job cancelled while queued never runs
    assert engine.waiting == 0
    while engine.step():
        pass
    assert out4.text == {} and 0 not in jobs[0][1].ends
    for (j, out), prompt, pa in list(zip(jobs, ["FIRST", "SECOND ONE", "3"], params))[1:]:
        assert out.text == run_alone(char_model, tok, prompt, pa).text


def test_drain_lets_jobs_finish_then_aborts_what_is_left(char_model):
    tok = CharTokenizer(CHARS)
    engine = Engine(char_model, tok, torch.device("cpu"), max_batch=2, max_queue=4)
    short, short_out = job(tok, ["A"], Params(max_tokens=5))
    engine.submit(short)
    engine.drain(grace_s=60)
    with pytest.raises(Overloaded, match="shutting down"):
        engine.submit(job(tok, ["B"], Params(max_tokens=5))[0])
    while engine.step():
        pass
    assert short_out.ends[0].reason == "length" and not short_out.aborts  # finished in its grace
    engine = Engine(char_model, tok, torch.device("cpu"), max_batch=1, max_queue=4)
    running, running_out = job(tok, ["A"], Params(max_tokens=50))
    queued, queued_out = job(tok, ["B"], Params(max_tokens=50))
    engine.submit(running)
    engine.submit(queued)
    engine.step()
    engine.drain(grace_s=0)
    engine.step()
    assert running_out.aborts == [Abort("the server is shutting down: the request was cancelled", 503)]
    assert queued_out.aborts == running_out.aborts and engine.running == engine.waiting == 0


def test_launch_computes_on_the_engines_own_thread_only(char_model):
    """Engine.launch builds the engine, warms it up and runs it on one thread of its own: the
    model never computes on the caller's thread (an OpenMP team left there slowed every decode
    step on 2 cores). A request then completes; an error while building reaches the caller."""
    import threading

    from gptforge.errors import GptforgeError

    tok = CharTokenizer(CHARS)
    computed_on: set[str] = set()
    hook = char_model.register_forward_pre_hook(
        lambda *_: computed_on.add(threading.current_thread().name))
    built_on = []

    def build() -> Engine:
        built_on.append(threading.current_thread().name)
        return Engine(char_model, tok, torch.device("cpu"), max_batch=2, max_queue=2)

    try:
        engine = Engine.launch(build)
        assert built_on == ["gptforge-engine"] and computed_on == {"gptforge-engine"}  # warmed up
        done = threading.Event()
        events = []
        engine.submit(Job([tok.encode("AB")], 1, Params(max_tokens=6, top_k=1),
                          lambda e: (events.append(e), isinstance(e, End) and done.set())))
        assert done.wait(timeout=60)
        engine.stop()
    finally:
        hook.remove()
    assert computed_on == {"gptforge-engine"} and events[-1] == End(0, "length", 6)
    assert engine._thread is not None and not engine._thread.is_alive()

    def broken() -> Engine:
        raise GptforgeError("checkpoint damaged")

    with pytest.raises(GptforgeError, match="checkpoint damaged"):
        Engine.launch(broken)
