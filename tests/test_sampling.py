"""The sampling step: one uniform a row, inverse-transform sampling over the filtered softmax.

``choose`` is checked against a reference written here from ``filter_logits`` (which the tests of
test_generate.py pin down) in plain Python, row by row; ``draw`` for its distribution and for
each row drawing from its own generator only.
"""

import math

import torch

from gptforge.sampling import choose, draw, filter_logits


def reference(row: torch.Tensor, key: tuple[float, int, float], u: float) -> int:
    """The lowest id whose cumulative probability (vocabulary order) exceeds u."""
    t, k, p = key
    kept = filter_logits((row / t)[None], k, p)[0]
    probs = torch.softmax(kept.double(), dim=-1).tolist()
    total = math.fsum(probs)
    mass = 0.0
    for tok, q in enumerate(probs):
        mass += q
        if q > 0 and mass > u * total:
            return tok
    return max(i for i, q in enumerate(probs) if q > 0)


def batch() -> tuple[torch.Tensor, list[tuple[float, int, float]]]:
    """Rows with settings that differ, ties at a k-th logit among them."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 300, generator=g) * 2
    logits[2, :6] = torch.tensor([4.0, 3.0, 3.0, 3.0, 3.0, 1.0])  # k=2 keeps the four 3.0s
    logits[2, 6:] = -5.0
    logits[3, 10:20] = 6.0  # ten tied maxima, k=4: past K + 1, every logit takes part
    keys = [(1.0, 50, 1.0), (0.7, 5, 1.0), (1.0, 2, 1.0), (1.3, 4, 1.0),
            (1.0, 0, 0.8), (0.9, 20, 0.5), (2.0, 0, 1.0)]
    return logits, keys


def test_choose_is_the_inverse_cdf_of_filter_logits_row_by_row():
    logits, keys = batch()
    B = logits.size(0)
    for u in [torch.full((B,), 0.0, dtype=torch.float64),
              torch.full((B,), 1 - 2**-53, dtype=torch.float64),
              *torch.rand(40, B, dtype=torch.float64, generator=torch.Generator().manual_seed(1))]:
        got = choose(logits, keys, u).tolist()
        want = [reference(logits[b], keys[b], float(u[b])) for b in range(B)]
        assert got == want
        # A row alone gets what it gets beside the others (whose K, V or ties differ).
        assert [int(choose(logits[b : b + 1], keys[b : b + 1], u[b : b + 1])) for b in range(B)] == got
        some = [0, 1, 2, 3, 5]  # all with a top-k: only the K + 1 best of each row take part
        assert choose(logits[some], [keys[b] for b in some], u[some]).tolist() == [got[b] for b in some]


def test_ties_with_the_kth_logit_are_kept_as_filter_logits_keeps_them():
    logits, keys = batch()
    seen = {int(choose(logits[2:3], [keys[2]], torch.tensor([u], dtype=torch.float64)))
            for u in torch.linspace(0, 0.999, 200).tolist()}
    assert seen == {0, 1, 2, 3, 4}


def test_draw_follows_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]])
    key = (0.8, 4, 0.9)
    exact = torch.softmax(filter_logits(logits / 0.8, 4, 0.9), -1)[0].double()
    n = 40_000
    tokens = draw(logits.expand(n, -1), [key], [torch.Generator().manual_seed(3)])
    freq = torch.bincount(torch.tensor(tokens), minlength=6).double() / n
    sigma = (exact * (1 - exact) / n).sqrt()
    assert freq[exact == 0].sum() == 0
    assert ((freq - exact).abs() <= 4 * sigma + 1e-12).all(), (freq, exact)


def test_each_row_draws_from_its_own_generator_and_greedy_rows_draw_nothing():
    logits, _ = batch()
    keys = [(1.0, 50, 1.0), (0.0, 1, 1.0), (0.8, 10, 0.9), (1.0, 0, 1.0)]
    rows = logits[:4]

    def gens():
        return [torch.Generator().manual_seed(s) for s in (5, 6, 7, 8)]

    together = draw(rows, keys, gens())
    alone = [draw(rows[b : b + 1], [keys[b]], [gens()[b]])[0] for b in range(4)]
    assert together == alone
    assert together[1] == int(rows[1].argmax())
    g = gens()
    draw(rows, keys, g)
    assert torch.equal(g[1].get_state(), torch.Generator().manual_seed(6).get_state())
    # One generator for the batch (gptforge sample's samples): row b takes its b-th uniform.
    u = torch.rand(3, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    one = draw(rows[[0, 2, 3]], [keys[0]], [torch.Generator().manual_seed(9)])
    assert one == choose(rows[[0, 2, 3]], [keys[0]] * 3, u).tolist()


def test_ties_in_bf16_logits_take_a_few_more_logits_not_the_whole_vocabulary(monkeypatch):
    """Logits computed in bfloat16 tie at the k-th often: the rows still get the reference's
    tokens, from the logits down to the k-th of any row and one more, not a sort of all V."""
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(8, 50257, generator=g) * 3).bfloat16().float()
    keys = [(1.0, 50, 1.0), (0.7, 40, 0.9)] * 4
    top = logits.topk(51).values
    assert (top[:, 50] == top[:, 49]).any()  # the tie this test is about
    u = torch.rand(8, dtype=torch.float64, generator=g)
    want = [reference(logits[b], keys[b], float(u[b])) for b in range(8)]
    taken = []
    topk = torch.topk
    monkeypatch.setattr(torch, "topk", lambda x, k, **kw: (taken.append(k), topk(x, k, **kw))[1])
    assert choose(logits, keys, u).tolist() == want
    assert taken[0] == 51 and len(taken) == 2 and 51 < taken[1] < 200, taken
