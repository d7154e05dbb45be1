"""`tasks.bootstrap`: intervals over the test examples, against a slow reference that indexes
the examples of every draw, and against the binomial's normal approximation."""

import math

import pytest
import sacrebleu
import torch
from sacrebleu.metrics import BLEU

from fourbit import tasks


def _accuracy_counts(correct: list[int]) -> torch.Tensor:
    right = torch.tensor(correct, dtype=torch.float64)
    return torch.stack([right, torch.ones_like(right)], 1)


def _slow_bootstrap(task, counts, reference, resamples, level, seed):
    """Every draw's examples taken by index and scored one by one; percentiles by sorting."""
    n = counts.shape[0]
    draws = torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    values = [task.metric_from_counts(counts[d].sum(0)) for d in draws]
    deltas = [v - task.metric_from_counts(reference[d].sum(0)) for v, d in zip(values, draws, strict=True)]

    def percentile(xs, q):  # linear interpolation between order statistics, as torch.quantile
        xs = sorted(xs)
        pos = q * (len(xs) - 1)
        lo = math.floor(pos)
        return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (pos - lo)

    qs = ((1 - level) / 2, (1 + level) / 2)
    return [percentile(values, q) for q in qs], [percentile(deltas, q) for q in qs]


@pytest.mark.parametrize("task_name", ["fashion-resnet20", "speech-bilstm"])
def test_intervals_match_a_slow_indexing_reference(task_name):
    task = tasks.get(task_name)
    g = torch.Generator().manual_seed(3)
    n = 57
    if task_name == "speech-bilstm":  # (digit errors, reference digits) per utterance
        digits = torch.randint(1, 8, (n,), generator=g)
        counts = torch.stack([torch.randint(0, 3, (n,), generator=g), digits], 1).double()
        reference = torch.stack([torch.randint(0, 2, (n,), generator=g), digits], 1).double()
    else:
        counts = _accuracy_counts(torch.randint(0, 2, (n,), generator=g).tolist())
        reference = _accuracy_counts(torch.randint(0, 2, (n,), generator=g).tolist())
    got = tasks.bootstrap(task, counts, reference, resamples=200, level=0.9, seed=7)
    (low, high), (dlow, dhigh) = _slow_bootstrap(task, counts, reference, 200, 0.9, 7)
    assert (got["low"], got["high"]) == pytest.approx((low, high), abs=1e-9)
    assert (got["delta_low"], got["delta_high"]) == pytest.approx((dlow, dhigh), abs=1e-9)
    full = task.metric_from_counts(counts.sum(0))
    assert got["value"] == full and got["delta"] == full - task.metric_from_counts(reference.sum(0))
    assert got["low"] < full < got["high"]


def test_accuracy_interval_has_the_binomial_width():
    """1,000 images, 80 % right: the 95 % interval is about ±1.96·sqrt(p(1-p)/n), ±2.48 points."""
    counts = _accuracy_counts([1] * 800 + [0] * 200)
    got = tasks.bootstrap(tasks.get("fashion-resnet20"), counts, resamples=2000, seed=0)
    half = 1.96 * math.sqrt(0.8 * 0.2 / 1000) * 100
    assert got["value"] == 80.0 and "delta" not in got
    assert got["high"] - got["low"] == pytest.approx(2 * half, rel=0.1)
    assert got["low"] < 80.0 < got["high"]


def test_paired_differences_cancel_what_both_share():
    """Two systems that disagree on 20 of 1,000 images: the paired interval of their difference
    is a fraction of either accuracy's own; against itself a system's difference is exactly 0."""
    task = tasks.get("fashion-resnet20")
    a = [1] * 700 + [0] * 300
    b = list(a)
    for i in range(0, 20):
        b[i] = 0  # b misses 20 that a gets right
    ca, cb = _accuracy_counts(a), _accuracy_counts(b)
    got = tasks.bootstrap(task, ca, cb, resamples=1000, seed=1)
    assert got["delta"] == pytest.approx(2.0)
    assert 0 < got["delta_low"] < 2.0 < got["delta_high"]
    assert got["delta_high"] - got["delta_low"] < 0.5 * (got["high"] - got["low"])
    itself = tasks.bootstrap(task, ca, ca, resamples=300, seed=1)
    assert itself["delta"] == itself["delta_low"] == itself["delta_high"] == 0.0


def test_draws_are_seeded_and_chunking_does_not_change_them():
    task = tasks.get("fashion-resnet20")
    counts = _accuracy_counts(
        torch.randint(0, 2, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    )
    first = tasks.bootstrap(task, counts, resamples=600, seed=4)
    assert tasks.bootstrap(task, counts, resamples=600, seed=4) == first
    assert tasks.bootstrap(task, counts, resamples=600, seed=5) != first
    # 600 draws come in chunks of 256: the same as drawing them at once
    (low, high), _ = _slow_bootstrap(task, counts, counts, 600, 0.95, 4)
    assert (first["low"], first["high"]) == pytest.approx((low, high), abs=1e-9)


def test_bleu_from_summed_sentence_counts_is_sacrebleus_corpus_bleu():
    task = tasks.get("translate-transformer")
    hyps = ["el gato se sentó en la alfombra", "y dijo Dios", "hola", "", "la luz era buena y grande"]
    refs = [
        "el gato está en la alfombra",
        "y dijo Dios: Sea la luz",
        "adiós amigo",
        "nada",
        "la luz era buena",
    ]
    scorer = BLEU(effective_order=True)
    rows = []
    for h, r in zip(hyps, refs, strict=True):
        s = scorer.sentence_score(h, [r])
        rows.append([s.sys_len, s.ref_len, *s.counts, *s.totals])
    counts = torch.tensor(rows, dtype=torch.float64)
    assert task.metric_from_counts(counts.sum(0)) == sacrebleu.corpus_bleu(hyps, [refs]).score
    assert task.metric_from_counts(counts[:3].sum(0)) == sacrebleu.corpus_bleu(hyps[:3], [refs[:3]]).score
    got = tasks.bootstrap(task, counts, resamples=100)
    assert 0 <= got["low"] <= got["high"] <= 100


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"counts": torch.zeros(0, 2)}, "one row per example, at least one"),
        ({"counts": torch.zeros(3)}, "one row per example"),
        ({"reference": torch.zeros(4, 2)}, "the same examples"),
        ({"resamples": 0}, "resamples must be a positive integer"),
        ({"level": 1.0}, "level must lie strictly between 0 and 1"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    args = {"counts": _accuracy_counts([1, 0, 1]), **kwargs}
    with pytest.raises(ValueError, match=message):
        tasks.bootstrap(tasks.get("fashion-resnet20"), **args)
