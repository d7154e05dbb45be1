"""The speech task: signal processing against numpy, the espeak-ng corpus, errors, CTC, training."""

import math

import numpy as np
import pytest
import torch

import fourbit
from fourbit import tasks
from fourbit.tasks import speech
from fourbit.tasks.idx import DataError


def numpy_log_mel(wave: np.ndarray) -> np.ndarray:
    """An independent log-mel: explicit frames, DFT by matrix product, filters built bin by bin."""
    win, hop, n_fft, n_mels, rate = 400, 160, 512, 40, 16000
    n = np.arange(win)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * n / win)  # periodic Hann
    frames = np.stack([wave[s : s + win] * hann for s in range(0, len(wave) - win + 1, hop)])
    k = np.arange(n_fft // 2 + 1)
    dft = np.exp(-2j * np.pi * np.outer(n, k) / n_fft)  # zero-padding to n_fft: rows past 400 vanish
    power = np.abs(frames @ dft) ** 2

    def mel(f):
        return 2595 * math.log10(1 + f / 700)

    lo, hi = mel(20.0), mel(8000.0)
    centers = [700 * (10 ** ((lo + i * (hi - lo) / (n_mels + 1)) / 2595) - 1) for i in range(n_mels + 2)]
    fb = np.zeros((len(k), n_mels))
    for m in range(n_mels):
        left, mid, right = centers[m], centers[m + 1], centers[m + 2]
        for b in k:
            f = b * rate / n_fft
            if left < f <= mid:
                fb[b, m] = (f - left) / (mid - left)
            elif mid < f < right:
                fb[b, m] = (right - f) / (right - mid)
    return np.log(power @ fb + 1e-6)


def test_log_mel_matches_numpy_and_a_tone_peaks_in_its_band():
    rng = np.random.default_rng(0)
    t = np.arange(8000) / 16000
    wave = 0.5 * np.sin(2 * np.pi * 1000 * t) + 0.01 * rng.standard_normal(t.size)
    ours = speech.log_mel(torch.from_numpy(wave.astype(np.float32))).numpy()
    ref = numpy_log_mel(wave.astype(np.float32).astype(np.float64))
    assert ours.shape == ref.shape == (1 + (8000 - 400) // 160, 40)
    np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=1e-4)
    # the band whose centre is nearest 1 kHz holds the most energy in every frame
    edges = speech._mel_to_hz(np.linspace(speech._hz_to_mel(20.0), speech._hz_to_mel(8000.0), 42))
    band = int(np.argmin(np.abs(edges[1:-1] - 1000.0)))
    assert (ours.argmax(1) == band).all()


@pytest.mark.parametrize(
    ("orig", "new", "freq"), [(22050, 16000, 1000.0), (22050, 16000, 6000.0), (16000, 22050, 440.0)]
)
def test_resampling_keeps_a_sines_frequency(orig, new, freq):
    n = orig  # one second
    x = np.sin(2 * np.pi * freq * np.arange(n) / orig)
    y = speech.resample(torch.from_numpy(x), orig, new).numpy()
    assert y.shape == (math.ceil(n * new / orig),)
    expected = np.sin(2 * np.pi * freq * np.arange(y.size) / new)
    inner = slice(100, y.size - 100)  # the edges see the zero padding
    assert np.abs(y[inner] - expected[inner]).max() < 5e-3
    spectrum = np.abs(np.fft.rfft(y * np.hanning(y.size)))
    assert abs(np.argmax(spectrum) * new / y.size - freq) <= 1.0


def test_resampling_removes_what_the_new_rate_cannot_hold():
    x = np.sin(2 * np.pi * 10000 * np.arange(22050) / 22050)  # above 8 kHz, the new Nyquist
    y = speech.resample(torch.from_numpy(x), 22050, 16000).numpy()
    assert np.abs(y[100:-100]).max() < 0.01


def test_parse_wav_reads_espeak_stdout_headers():
    samples = np.array([0, 16384, -32768, 32767], dtype="<i2")
    fmt = b"fmt " + (16).to_bytes(4, "little") + np.array([1, 1], "<u2").tobytes()
    fmt += np.array([22050, 44100], "<u4").tobytes() + np.array([2, 16], "<u2").tobytes()
    raw = b"RIFF" + b"\xff\xff\xff\x7f" + b"WAVE" + fmt + b"data" + b"\x00\xf0\xff\x7f" + samples.tobytes()
    wave, rate = speech.parse_wav(raw)
    assert rate == 22050
    np.testing.assert_array_equal(wave, [0.0, 0.5, -1.0, 32767 / 32768])
    with pytest.raises(ValueError):
        speech.parse_wav(b"not a wav file at all")


def test_speaker_split_is_disjoint_and_covers_every_pair():
    spk = speech.speakers()
    train, test = set(spk["train"]), set(spk["test"])
    assert not train & test
    assert len(train) + len(test) == len(speech.ACCENTS) * len(speech.VARIANTS)
    assert len(test) == math.ceil(0.1 * (len(train) + len(test)))
    plan = speech.plan("test", 50)
    assert {(u.accent, u.variant) for u in plan} <= test
    assert all(1 <= len(u.digits) <= 7 for u in plan)


def test_greedy_decode_merges_repeats_and_drops_blanks():
    b = speech.BLANK
    paths = [[3, 3, b, 3, 1, 1, b, b, 4], [b, b, 7, 7, 7, b], [5, 5, b, 5, b, 5]]
    logits = torch.full((3, 9, 11), -5.0)
    for i, path in enumerate(paths):
        for t, c in enumerate(path):
            logits[i, t, c] = 5.0
    lengths = torch.tensor([9, 6, 4])  # the third is cut after "5 5 _ 5"
    assert speech.greedy_decode(logits, lengths) == [[3, 3, 1, 4], [7], [5, 5]]


def test_edit_distance_on_hand_made_examples():
    assert speech.edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert speech.edit_distance([1, 2, 3], [1, 3]) == 1  # deletion
    assert speech.edit_distance([1, 2, 3], [1, 2, 4, 3]) == 1  # insertion
    assert speech.edit_distance([1, 2, 3], [3, 2, 1]) == 2  # two substitutions
    assert speech.edit_distance([], [5, 5]) == 2
    assert speech.edit_distance([4, 4, 4], []) == 3


def test_metrics_from_a_model_that_outputs_fixed_logits():
    class Fixed(torch.nn.Module):
        stack = 1

        def __init__(self, logits):
            super().__init__()
            self.logits = torch.nn.Parameter(logits)

        def forward(self, x):
            return self.logits[: x.shape[0], : x.shape[1]]

    b = speech.BLANK
    logits = torch.full((2, 4, 11), -5.0)
    for i, path in enumerate([[1, b, 2, 2], [9, 9, b, 9]]):
        for t, c in enumerate(path):
            logits[i, t, c] = 5.0
    task = speech.SpeechBiLSTM()
    batch = task.collate(
        [(torch.zeros(4, 40), torch.tensor([1, 2])), (torch.zeros(4, 40), torch.tensor([9, 8, 9]))]
    )
    metrics = task.evaluate(Fixed(logits), [batch])  # second: "9 9" for "9 8 9", one deletion
    assert metrics["digit_error_rate"] == pytest.approx(100 * 1 / 5)
    assert metrics["string_accuracy"] == pytest.approx(50.0)
    again, counts = task.evaluate_examples(Fixed(logits), [batch])
    assert again == metrics and counts.tolist() == [[0.0, 2.0], [1.0, 3.0]]  # (errors, digits)
    assert task.metric_from_counts(counts[1]) == pytest.approx(100 / 3)


def test_synthetic_batch_has_the_real_shapes_and_trains():
    task = speech.SpeechBiLSTM(hidden=16)
    x, lengths, y, label_lengths = task.synthetic_batch(3, 40, torch.Generator().manual_seed(0))
    assert x.shape == (3, 40, 40) and lengths.tolist() == [40, 40, 40]
    assert y.shape == (3, int(label_lengths.max())) and int(label_lengths.min()) >= 1
    for row, n in zip(y, label_lengths, strict=True):
        assert int(row[:n].max()) <= 9 and (row[n:] == speech.BLANK).all()
    loss, n = task.loss(task.build_model(), (x, lengths, y, label_lengths))
    assert n == 3 and torch.isfinite(loss)


def test_the_registry_knows_the_task():
    task = tasks.get("speech-bilstm")
    assert isinstance(task, speech.SpeechBiLSTM)
    assert task.metric_name == "digit_error_rate" and not task.higher_is_better
    assert task.packages == ("espeak-ng",) and task.defaults.optimizer == "adam"


def test_missing_espeak_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    task = speech.SpeechBiLSTM()
    status = task.data_status(tmp_path / "corpus")
    assert status is not None and "sudo apt-get install espeak-ng" in status and "\n" not in status
    with pytest.raises(DataError, match=r"sudo apt-get install espeak-ng") as err:
        task.dataset("train", tmp_path / "corpus", None, 0)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "corpus" / "train.pt").exists()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("speech")
    speech.build_corpus(root / "a", n_train=24, n_test=8, seed=1, progress=False)
    return root


def test_tiny_corpus_is_deterministic_and_split_by_speaker(tiny):
    again = speech.build_corpus(tiny / "b", n_train=24, n_test=8, seed=1, progress=False)
    other = speech.build_split(tiny / "c" / "test.pt", "test", 8, seed=2, progress=False)
    a = {s: speech.load_split(tiny / "a" / f"{s}.pt") for s in speech.SPLITS}
    b = {s: speech.load_split(again / f"{s}.pt") for s in speech.SPLITS}
    c = speech.load_split(other)
    for s in speech.SPLITS:
        assert torch.equal(a[s]["features"], b[s]["features"])
        assert torch.equal(a[s]["labels"], b[s]["labels"])
    assert not torch.equal(a["test"]["labels"], c["labels"])
    assert a["test"]["features"].shape != c["features"].shape or not torch.equal(
        a["test"]["features"], c["features"]
    )
    assert a["train"]["features"].dtype == torch.float16 and a["train"]["features"].shape[1] == 40
    assert len(a["train"]["speakers"]) == 24 and len(a["test"]["speakers"]) == 8
    train_speakers, test_speakers = set(a["train"]["speaker_names"]), set(a["test"]["speaker_names"])
    assert len(test_speakers) == 8 and not train_speakers & test_speakers
    assert all(s.split("+", 1)[0] in speech.ACCENTS for s in train_speakers | test_speakers)
    assert not [p for p in (tiny / "a").iterdir() if p.suffix == ".tmp"]


def test_dataset_items_collate_and_limit(tiny):
    task = speech.SpeechBiLSTM()
    full = task.dataset("train", tiny / "a", None, 0)
    part = task.dataset("train", tiny / "a", 10, 0)
    assert len(full) == 24 and len(part) == 10
    again, other = task.dataset("train", tiny / "a", 10, 0), task.dataset("train", tiny / "a", 10, 5)
    assert torch.equal(part.indices, again.indices) and not torch.equal(part.indices, other.indices)
    assert torch.equal(part.indices, part.indices.sort().values)
    x, y = full[0]
    assert x.dtype == torch.float32 and x.shape[1] == 40 and x.shape[0] > 30
    assert torch.allclose(x.mean(0), torch.zeros(40), atol=1e-3)
    assert y.dtype == torch.int64 and 1 <= len(y) <= 7 and int(y.max()) <= 9
    feats, lengths, labels, label_lengths = task.collate([full[i] for i in range(4)])
    assert feats.shape == (4, int(lengths.max()), 40)
    assert labels.shape == (4, int(label_lengths.max()))
    for i in range(4):
        assert torch.equal(feats[i, : lengths[i]], full[i][0])
        assert torch.equal(labels[i, : label_lengths[i]], full[i][1])


def test_corrupt_or_truncated_cache_is_one_clear_error(tiny, tmp_path):
    task = speech.SpeechBiLSTM()
    good = (tiny / "a" / "test.pt").read_bytes()
    for name, content in {
        "garbage": b"this is not a torch file",
        "truncated": good[: len(good) // 2],
    }.items():
        directory = tmp_path / name
        directory.mkdir()
        (directory / "test.pt").write_bytes(content)
        with pytest.raises(DataError, match=r"test\.pt is corrupt or unreadable.*delete it") as err:
            task.dataset("test", directory, None, 0)
        assert "\n" not in str(err.value) and str(directory) in str(err.value)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    torch.save({"features": torch.zeros(3)}, wrong / "test.pt")
    with pytest.raises(DataError, match=r"not a speech corpus file"):
        task.dataset("test", wrong, None, 0)


@pytest.mark.parametrize("recipe", ["fp32", "ibm4"])
def test_one_training_step_and_one_evaluation(tiny, recipe, one_thread):
    torch.manual_seed(0)
    task = speech.SpeechBiLSTM(hidden=32)
    train = task.dataset("train", tiny / "a", None, 0)
    test = task.dataset("test", tiny / "a", 4, 0)
    shortest = sorted(range(len(train)), key=lambda i: train[i][0].shape[0])[:6]  # keeps the test fast
    batch = task.collate([train[i] for i in shortest])
    model = task.build_model()
    fourbit.convert(model, recipe, example_input=task.model_inputs(batch), verbose=False)
    if recipe == "ibm4":
        assert type(model.lstm).__name__ == "QLSTM"
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss, n = task.loss(model, batch)
    assert n == 6 and loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    loader = torch.utils.data.DataLoader(test, batch_size=2, collate_fn=task.collate)
    metrics = task.evaluate(model, loader)
    assert set(metrics) == {"digit_error_rate", "string_accuracy"}
    assert metrics["digit_error_rate"] >= 0 and 0 <= metrics["string_accuracy"] <= 100
    assert model.training
