"""Spoken digit strings: a corpus synthesized with espeak-ng, and a 4-layer BiLSTM with CTC.

The corpus (`build_corpus`): strings of 1–7 digits ("three one four") spoken by speakers =
(English accent × espeak-ng voice variant) pairs, at random speed and pitch, with white or
pink noise added at 5–35 dB SNR; resampled 22,050 → 16,000 Hz (windowed-sinc, here in
torch) and turned into 40-band log-mel frames (25 ms Hann window, 10 ms hop). The
train/test split is by speaker: no (accent, variant) pair of the test set is ever heard in
training. Every random choice comes from the seed, so the corpus is the same on every
machine with the same espeak-ng. It is generated once, both CPU cores at work, and cached
as one float16 `.pt` file per split (`$FOURBIT_CACHE` or `~/.cache/fourbit`, subdir
`speech-v1`), each written to a temporary file and renamed, so an interrupted run leaves
no half cache.

The task (`SpeechBiLSTM`): log-mels, normalized per utterance, stacked 4 frames at a time
(40 ms steps) → Linear 160→128 → 4-layer bidirectional LSTM (128 per direction) → Linear
256→11 (10 digits + the CTC blank); CTC loss; greedy CTC decoding; metric: digit error
rate (edit distance / reference length, %) and whole-string accuracy.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import struct
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from fourbit.io import atomic_write
from fourbit.tasks.base import Defaults, Task, percentage
from fourbit.tasks.idx import DataError

ESPEAK = "espeak-ng"
ESPEAK_PACKAGE = "espeak-ng"
INSTALL_HINT = f"install it with: sudo apt-get install {ESPEAK_PACKAGE}"
VERSION = "speech-v1"  # bump when anything below changes what the corpus holds
CORPUS_SEED = 2020
N_TRAIN, N_TEST = 12_000, 1_500
TEST_SPEAKER_FRACTION = 0.1

SAMPLE_RATE = 16_000
N_MELS, WIN, HOP, N_FFT = 40, 400, 160, 512  # 25 ms window, 10 ms hop at 16 kHz
F_MIN, F_MAX = 20.0, 8_000.0
LOG_FLOOR = 1e-6
BLANK = 10  # class d is digit d; class 10 is the CTC blank
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MIN_DIGITS, MAX_DIGITS = 1, 7
SPEED_WPM = (130, 230)  # espeak-ng -s (default 175)
PITCH = (25, 75)  # espeak-ng -p (0–99, default 50)
SNR_DB = (5.0, 35.0)
EDGE_SILENCE_S = (0.05, 0.25)  # silence (noise only) before and after the speech, once trimmed
TRIM_LEVEL = 0.005  # espeak-ng's own leading/trailing silence: below this fraction of the peak

# English accents of `espeak-ng --voices=en` that speak here (the mbrola ones need voice
# files Debian does not ship; en-uk is an alias of en-gb)
ACCENTS = (
    "en-gb", "en-us", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd",
    "en-029", "en-us-nyc",
)  # fmt: skip
# files of `espeak-ng --voices=variant` (voices/!v/); left out: `fast` (sounds as no
# variant), `caleb` and `klatt6` (the same sound as `klatt`)
VARIANTS = (
    "Alex", "Alicia", "Andrea", "Andy", "Annie", "AnxiousAndy", "Demonic", "Denis", "Diogo",
    "Gene", "Gene2", "Henrique", "Hugo", "Jacky", "Lee", "Marco", "Mario", "Michael", "Mike",
    "Mr serious", "Nguyen", "RicishayMax", "RicishayMax2", "RicishayMax3", "Storm", "Tweaky",
    "UniRobot", "adam", "anika", "anikaRobot", "announcer", "antonio", "aunty", "belinda",
    "benjamin", "boris", "croak", "david", "ed", "edward", "edward2", "f1", "f2", "f3", "f4",
    "f5", "grandma", "grandpa", "gustave", "iven", "iven2", "iven3", "iven4", "john",
    "kaukovalta", "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "linda", "m1", "m2", "m3",
    "m4", "m5", "m6", "m7", "m8", "marcelo", "max", "michel", "miguel", "norbert", "pablo",
    "paul", "pedro", "quincy", "rob", "robert", "robosoft", "robosoft2", "robosoft3",
    "robosoft4", "robosoft5", "robosoft6", "robosoft7", "robosoft8", "sandro", "shelby",
    "steph", "steph2", "steph3", "travis", "victor", "whisper", "whisperf", "zac",
)  # fmt: skip
SPLITS = ("train", "test")


# -- signal processing (torch) ----------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _sinc_kernel(orig: int, new: int, zeros: int, rolloff: float) -> tuple[Tensor, int]:
    """Polyphase windowed-sinc kernels [new, 1, orig + 2·width] (float64) and `width`."""
    cutoff = rolloff * min(orig, new) / (2 * orig)  # in cycles per input sample
    width = math.ceil(zeros / (2 * cutoff))  # half-length in input samples
    taps = torch.arange(orig + 2 * width, dtype=torch.float64) - width  # input offset of each tap
    phases = torch.arange(new, dtype=torch.float64)[:, None] * orig / new  # output positions
    t = taps[None, :] - phases
    window = torch.where(t.abs() <= width, torch.cos(math.pi * t / (2 * width)) ** 2, 0.0)
    kernel = 2 * cutoff * torch.sinc(2 * cutoff * t) * window
    return kernel[:, None, :], width


def resample(x: Tensor, orig_rate: int, new_rate: int, zeros: int = 8, rolloff: float = 0.95) -> Tensor:
    """Band-limited resampling of `x` [..., N] (windowed-sinc interpolation, Hann window,
    `zeros` sinc zero crossings each side, low-pass at `rolloff` × the lower Nyquist)."""
    if orig_rate == new_rate:
        return x
    g = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // g, new_rate // g
    kernel, width = _sinc_kernel(orig, new, zeros, rolloff)
    shape, n = x.shape[:-1], x.shape[-1]
    n_out = math.ceil(n * new / orig)
    blocks = math.ceil(n_out / new)
    flat = x.reshape(-1, 1, n)
    right = (blocks - 1) * orig + kernel.shape[-1] - width - n
    flat = F.pad(flat, (width, max(right, 0)))
    y = F.conv1d(flat, kernel.to(x.dtype), stride=orig)  # [B, new, blocks]
    y = y.transpose(1, 2).reshape(flat.shape[0], -1)[:, :n_out]
    return y.reshape(*shape, n_out)


def _hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def _mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(
    n_mels: int = N_MELS, n_fft: int = N_FFT, rate: int = SAMPLE_RATE, f_min=F_MIN, f_max=F_MAX
) -> Tensor:
    """Triangular HTK-mel filters [n_fft // 2 + 1, n_mels] (peak 1, no area normalization)."""
    edges = _mel_to_hz(np.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2))
    bins = np.arange(n_fft // 2 + 1) * rate / n_fft
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rise = (bins[None, :] - lo) / (mid - lo)
    fall = (hi - bins[None, :]) / (hi - mid)
    return torch.from_numpy(np.clip(np.minimum(rise, fall), 0.0, None).T.astype(np.float32))


_FBANK = mel_filterbank()
_WINDOW = torch.hann_window(WIN, periodic=True, dtype=torch.float32)


def log_mel(wave: Tensor) -> Tensor:
    """40-band log-mel power [frames, 40] of a 16 kHz waveform [N]: 25 ms periodic Hann
    windows every 10 ms (no centering: frame t covers samples 160·t … 160·t + 399), 512-point
    FFT, HTK-mel triangles 20–8000 Hz, natural log with a 1e-6 floor."""
    wave = wave.to(torch.float32)
    if wave.numel() < WIN:
        wave = F.pad(wave, (0, WIN - wave.numel()))
    frames = wave.unfold(0, WIN, HOP) * _WINDOW
    power = torch.fft.rfft(frames, n=N_FFT).abs() ** 2
    return torch.log(power @ _FBANK + LOG_FLOOR)


# -- espeak-ng ----------------------------------------------------------------------------
def espeak_path() -> str | None:
    return shutil.which(ESPEAK)


def _require_espeak() -> str:
    exe = espeak_path()
    if exe is None:
        raise DataError(
            f"the speech corpus is synthesized with {ESPEAK}, which is not installed; {INSTALL_HINT}"
        )
    return exe


def _espeak_info(exe: str) -> tuple[str, Path | None]:
    """(version line, data directory) from `espeak-ng --version`."""
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise DataError(f"cannot run {exe}: {e}; {INSTALL_HINT}") from None
    line = out.strip().splitlines()[0] if out.strip() else "unknown version"
    data = Path(line.split("Data at:")[1].strip()) if "Data at:" in line else None
    return line, data


def parse_wav(raw: bytes) -> tuple[np.ndarray, int]:
    """(float32 samples in [-1, 1], rate) of a mono 16-bit PCM WAV, as espeak-ng writes it
    (to stdout its size fields are placeholders: the data runs to the end)."""
    if len(raw) < 12 or raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE stream")
    pos, rate, fmt_ok = 12, None, False
    while pos + 8 <= len(raw):
        cid, size = raw[pos : pos + 4], struct.unpack("<I", raw[pos + 4 : pos + 8])[0]
        body = pos + 8
        if cid == b"fmt ":
            tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", raw[body : body + 16])
            fmt_ok = tag == 1 and channels == 1 and bits == 16
        elif cid == b"data":
            if not fmt_ok:
                raise ValueError("WAV is not mono 16-bit PCM")
            data = raw[body : body + size] if body + size <= len(raw) else raw[body:]
            data = data[: len(data) // 2 * 2]
            return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0, rate
        pos = body + size + (size & 1)
    raise ValueError("WAV has no data chunk")


@dataclass(frozen=True)
class Utterance:
    """Everything that decides one utterance's features."""

    digits: tuple[int, ...]
    accent: str
    variant: str
    speed: int
    pitch: int
    snr_db: float
    pink: bool
    lead_s: float
    tail_s: float
    noise_seed: int

    @property
    def text(self) -> str:
        return " ".join(DIGIT_WORDS[d] for d in self.digits)

    @property
    def speaker(self) -> str:
        return f"{self.accent}+{self.variant}"


def synthesize(exe: str, utt: Utterance) -> tuple[np.ndarray, int]:
    """espeak-ng's waveform of the utterance (float32) and its rate (22,050 Hz)."""
    cmd = [exe, "-v", utt.speaker, "-s", str(utt.speed), "-p", str(utt.pitch), "--stdout", utt.text]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise DataError(f"{ESPEAK} failed ({e}); {INSTALL_HINT}") from None
    err = proc.stderr.decode(errors="replace").strip()
    if proc.returncode != 0 or err:
        why = err.splitlines()[0] if err else f"exit status {proc.returncode}"
        raise DataError(f"{ESPEAK} -v {utt.speaker} failed: {why}")
    try:
        wave, rate = parse_wav(proc.stdout)
    except (ValueError, struct.error) as e:
        raise DataError(f"{ESPEAK} -v {utt.speaker} wrote no usable WAV: {e}") from None
    return wave, rate


def _noise(n: int, pink: bool, rng: np.random.Generator) -> np.ndarray:
    white = rng.standard_normal(n)
    if not pink:
        return white
    spectrum = np.fft.rfft(white)
    f = np.arange(spectrum.size, dtype=np.float64)
    f[0] = 1.0
    return np.fft.irfft(spectrum / np.sqrt(f), n)


def features(wave: np.ndarray, rate: int, utt: Utterance) -> Tensor:
    """espeak-ng's waveform, resampled to 16 kHz, trimmed, padded, noised → float16 log-mels [frames, 40]."""
    wave = resample(torch.from_numpy(wave.astype(np.float32)), rate, SAMPLE_RATE).numpy().astype(np.float64)
    rng = np.random.default_rng(utt.noise_seed)
    loud = np.nonzero(np.abs(wave) > TRIM_LEVEL * np.abs(wave).max(initial=0.0))[0]
    if loud.size:
        wave = wave[loud[0] : loud[-1] + 1]
    lead, tail = round(utt.lead_s * SAMPLE_RATE), round(utt.tail_s * SAMPLE_RATE)
    speech = wave[np.abs(wave) > 1e-4]
    power = float(np.mean(speech**2)) if speech.size else 1e-4
    wave = np.concatenate([np.zeros(lead), wave, np.zeros(tail)])
    noise = _noise(wave.size, utt.pink, rng)
    noise *= math.sqrt(power / (np.mean(noise**2) * 10.0 ** (utt.snr_db / 10.0)))
    return log_mel(torch.from_numpy((wave + noise).astype(np.float32))).to(torch.float16)


def utterance_features(exe: str, utt: Utterance) -> Tensor:
    return features(*synthesize(exe, utt), utt)


# -- the corpus -------------------------------------------------------------------------
def speakers(seed: int = CORPUS_SEED) -> dict[str, list[tuple[str, str]]]:
    """{"train": [...], "test": [...]} (accent, variant) pairs: a seeded split of all pairs."""
    pairs = [(a, v) for a in ACCENTS for v in VARIANTS]
    order = np.random.default_rng([seed, 1]).permutation(len(pairs))
    n_test = math.ceil(TEST_SPEAKER_FRACTION * len(pairs))
    return {"test": [pairs[i] for i in order[:n_test]], "train": [pairs[i] for i in order[n_test:]]}


def plan(split: str, n: int, seed: int = CORPUS_SEED) -> list[Utterance]:
    """The `n` utterances of a split: speakers in turn, everything else drawn from the seed."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    spk = speakers(seed)[split]
    rng = np.random.default_rng([seed, 2, SPLITS.index(split)])
    out = []
    for i in range(n):
        accent, variant = spk[i % len(spk)]
        length = int(rng.integers(MIN_DIGITS, MAX_DIGITS + 1))
        out.append(
            Utterance(
                digits=tuple(int(d) for d in rng.integers(0, 10, length)),
                accent=accent,
                variant=variant,
                speed=int(rng.integers(SPEED_WPM[0], SPEED_WPM[1] + 1)),
                pitch=int(rng.integers(PITCH[0], PITCH[1] + 1)),
                snr_db=round(float(rng.uniform(*SNR_DB)), 3),
                pink=bool(rng.integers(0, 2)),
                lead_s=round(float(rng.uniform(*EDGE_SILENCE_S)), 4),
                tail_s=round(float(rng.uniform(*EDGE_SILENCE_S)), 4),
                noise_seed=int(rng.integers(0, 2**63 - 1)),
            )
        )
    return out


def _check_voices(data_dir: Path | None) -> None:
    if data_dir is None or not (data_dir / "voices" / "!v").is_dir():
        return
    missing = [v for v in VARIANTS if not (data_dir / "voices" / "!v" / v).exists()]
    if missing:
        warnings.warn(
            f"{ESPEAK} at {data_dir} lacks the variants {missing}; they speak as the plain "
            "accent, so this corpus differs from one made with espeak-ng 1.51",
            stacklevel=3,
        )


def build_split(
    path: Path, split: str, n: int, seed: int = CORPUS_SEED, workers: int | None = None, progress: bool = True
) -> Path:
    """Synthesize one split into `path` (atomically): see `load_split` for what it holds."""
    exe = _require_espeak()
    version, data = _espeak_info(exe)
    _check_voices(data)
    utts = plan(split, n, seed)
    workers = workers or (os.cpu_count() or 1) + 1
    feats: list[Tensor] = []
    bar = None
    if progress and sys.stderr.isatty():  # (a bar redrawn into a log file is only noise)
        from tqdm import tqdm

        bar = tqdm(total=n, desc=f"speech corpus: {split}", unit="utt")
    start = time.perf_counter()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the parallelism is across utterances (each its own espeak-ng)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        for f in pool.map(lambda u: utterance_features(exe, u), utts):
            feats.append(f)
            if bar is not None:
                bar.update()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on an error, do not run the rest
        torch.set_num_threads(prev_threads)
        if bar is not None:
            bar.close()
    lengths = torch.tensor([f.shape[0] for f in feats], dtype=torch.int64)
    label_lengths = torch.tensor([len(u.digits) for u in utts], dtype=torch.int64)
    names = sorted({u.speaker for u in utts})
    index = {s: i for i, s in enumerate(names)}
    blob = {
        "version": VERSION,
        "split": split,
        "seed": seed,
        "espeak": version,
        "features": torch.cat(feats) if feats else torch.zeros(0, N_MELS, dtype=torch.float16),
        "offsets": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
        "labels": torch.tensor([d for u in utts for d in u.digits], dtype=torch.int8),
        "label_offsets": torch.cat([torch.zeros(1, dtype=torch.int64), label_lengths.cumsum(0)]),
        "speaker_names": names,
        "speakers": torch.tensor([index[u.speaker] for u in utts], dtype=torch.int32),
        "seconds": round(time.perf_counter() - start, 2),
    }
    return atomic_write(path, lambda tmp: torch.save(blob, tmp))


def build_corpus(
    out_dir: str | Path,
    n_train: int = N_TRAIN,
    n_test: int = N_TEST,
    seed: int = CORPUS_SEED,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Write `train.pt` and `test.pt` into `out_dir`, each only where it is missing."""
    out_dir = Path(out_dir)
    for split, n in (("train", n_train), ("test", n_test)):
        if not (out_dir / f"{split}.pt").exists():
            build_split(out_dir / f"{split}.pt", split, n, seed, workers, progress)
    return out_dir


_KEYS = {"features", "offsets", "labels", "label_offsets", "speaker_names", "speakers", "version"}


def load_split(path: Path) -> dict:
    """A split file: features float16 [all frames, 40] with `offsets` [N + 1] into them;
    labels int8 (digits) with `label_offsets` [N + 1]; speakers int32 [N] indexing
    `speaker_names` ("accent+variant"); version, split, seed, espeak (version line)."""
    path = Path(path)
    try:
        blob = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # torch/pickle/zip raise many kinds; all mean the same here
        raise DataError(
            f"{path} is corrupt or unreadable ({type(e).__name__}); delete it to regenerate"
        ) from None
    if not isinstance(blob, dict) or not set(blob) >= _KEYS:
        raise DataError(f"{path} is not a speech corpus file; delete it to regenerate")
    if blob["version"] != VERSION:
        raise DataError(f"{path} holds corpus {blob['version']!r}, not {VERSION!r}; delete it to regenerate")
    try:
        feats, off, lab, loff = blob["features"], blob["offsets"], blob["labels"], blob["label_offsets"]
        n = len(blob["speakers"])
        ok = (
            feats.dtype == torch.float16
            and feats.dim() == 2
            and feats.shape[1] == N_MELS
            and off.shape == (n + 1,) == loff.shape
            and int(off[-1]) == feats.shape[0]
            and int(loff[-1]) == lab.numel()
            and bool((off.diff() > 0).all())
            and bool((loff.diff() > 0).all())
            and (n == 0 or len(blob["speaker_names"]) > int(blob["speakers"].max()))
        )
    except (AttributeError, TypeError, IndexError, RuntimeError):
        ok = False
    if not ok:
        raise DataError(f"{path} is truncated or inconsistent; delete it to regenerate")
    return blob


def default_cache_dir() -> Path:
    root = os.environ.get("FOURBIT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "fourbit") / VERSION


class SpeechDataset(Dataset):
    """Items: (log-mels float32 [frames, 40], normalized per utterance; digits int64 [L])."""

    def __init__(self, blob: dict, indices: Tensor | None = None):
        self.features = blob["features"]
        self.offsets = blob["offsets"]
        self.labels = blob["labels"]
        self.label_offsets = blob["label_offsets"]
        self.speakers = blob["speakers"]
        self.speaker_names = list(blob["speaker_names"])
        n = len(self.speakers)
        self.indices = torch.arange(n) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def speaker(self, i: int) -> str:
        return self.speaker_names[int(self.speakers[self.indices[i]])]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        j = int(self.indices[i])
        x = self.features[self.offsets[j] : self.offsets[j + 1]].float()
        x = (x - x.mean(0)) / (x.std(0, unbiased=False) + 1e-3)
        y = self.labels[self.label_offsets[j] : self.label_offsets[j + 1]].long()
        return x, y


# -- model, decoding, metric ----------------------------------------------------------------
class BiLSTMCTC(nn.Module):
    """Log-mels [B, T, 40] → CTC logits [B, ceil(T / stack), 11]."""

    def __init__(self, n_mels=N_MELS, stack=4, hidden=128, layers=4, classes=BLANK + 1, dropout=0.1):
        super().__init__()
        self.stack = stack
        self.proj = nn.Linear(n_mels * stack, hidden)
        self.lstm = nn.LSTM(hidden, hidden, layers, batch_first=True, bidirectional=True, dropout=dropout)
        self.out = nn.Linear(2 * hidden, classes)

    def output_lengths(self, lengths: Tensor) -> Tensor:
        return torch.div(lengths + self.stack - 1, self.stack, rounding_mode="floor")

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        pad = (-T) % self.stack
        x = F.pad(x, (0, 0, 0, pad)).reshape(B, (T + pad) // self.stack, D * self.stack)
        h, _ = self.lstm(self.proj(x))
        return self.out(h)


def greedy_decode(logits: Tensor, lengths: Tensor, blank: int = BLANK) -> list[list[int]]:
    """Best path per sequence: argmax per frame, repeats merged, blanks dropped."""
    best = logits.argmax(-1).cpu()
    out = []
    for b, n in enumerate(lengths.tolist()):
        path = best[b, :n].tolist()
        out.append([c for k, c in enumerate(path) if c != blank and (k == 0 or c != path[k - 1])])
    return out


def edit_distance(ref, hyp) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i]
        for j, h in enumerate(hyp, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h)))
        prev = cur
    return prev[-1]


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class SpeechBiLSTM(Task):
    """Spoken digit strings (espeak-ng, held-out speakers): 4-layer BiLSTM + CTC."""

    name = "speech-bilstm"
    metric_name = "digit_error_rate"
    higher_is_better = False
    packages = (ESPEAK_PACKAGE,)
    defaults = Defaults(epochs=10, batch_size=32, lr=2e-3, optimizer="adam", weight_decay=0.0)

    def __init__(self, n_train: int = N_TRAIN, n_test: int = N_TEST, hidden: int = 128):
        self.n_train, self.n_test, self.hidden = n_train, n_test, hidden

    def _dir(self, data_dir: Path | None) -> Path:
        return Path(data_dir) if data_dir is not None else default_cache_dir()

    def data_status(self, data_dir: Path | None) -> str | None:
        directory = self._dir(data_dir)
        if all((directory / f"{s}.pt").exists() for s in SPLITS) or espeak_path() is not None:
            return None
        return (
            f"the speech corpus is synthesized with {ESPEAK}; {INSTALL_HINT} "
            f"(or pass a --data-dir holding train.pt and test.pt)"
        )

    def dataset(self, split: str, data_dir: Path | None, limit: int | None, seed: int) -> Dataset:
        """The split, generated into `data_dir` (default: the cache) on first use; with a
        `limit`, the first `limit` utterances of a `seed`-fixed shuffle, in corpus order."""
        if split not in SPLITS:
            raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
        path = self._dir(data_dir) / f"{split}.pt"
        if not path.exists():
            n = self.n_train if split == "train" else self.n_test
            build_split(path, split, n)
        blob = load_split(path)
        n = len(blob["speakers"])
        indices = None
        if limit is not None:
            indices = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values
        return SpeechDataset(blob, indices)

    def collate(self, examples: list) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(features [B, T_max, 40] zero-padded, frame counts [B], digits [B, L_max] padded
        with the blank, digit counts [B])."""
        feats, labels = zip(*examples, strict=True)
        lengths = torch.tensor([f.shape[0] for f in feats], dtype=torch.int64)
        label_lengths = torch.tensor([len(y) for y in labels], dtype=torch.int64)
        x = nn.utils.rnn.pad_sequence(list(feats), batch_first=True)
        y = nn.utils.rnn.pad_sequence(list(labels), batch_first=True, padding_value=BLANK)
        return x, lengths, y, label_lengths

    def synthetic_batch(self, batch_size: int, length: int | None, generator: torch.Generator):
        """Random normalized log-mels of `length` frames (default 100) and 1–7 random digits."""
        length = length or 100
        x = torch.randn(batch_size, length, N_MELS, generator=generator)
        label_lengths = torch.randint(MIN_DIGITS, MAX_DIGITS + 1, (batch_size,), generator=generator)
        y = torch.randint(0, 10, (batch_size, int(label_lengths.max())), generator=generator)
        y[torch.arange(y.shape[1]) >= label_lengths[:, None]] = BLANK
        return x, torch.full((batch_size,), length, dtype=torch.int64), y, label_lengths

    def build_model(self) -> nn.Module:
        return BiLSTMCTC(hidden=self.hidden)

    def model_inputs(self, batch) -> tuple:
        return (batch[0],)

    def _forward(self, model: nn.Module, batch) -> tuple[Tensor, Tensor]:
        x, lengths = batch[0].to(_device(model)), batch[1]
        logits = model(x)
        stack = getattr(model, "stack", 1)
        out_lengths = torch.div(lengths + stack - 1, stack, rounding_mode="floor")
        return logits, out_lengths.clamp(max=logits.shape[1])

    def loss(self, model: nn.Module, batch) -> tuple[Tensor, int]:
        logits, out_lengths = self._forward(model, batch)
        log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # [T, B, C]
        targets, target_lengths = batch[2].to(log_probs.device), batch[3]
        loss = F.ctc_loss(
            log_probs, targets, out_lengths, target_lengths, blank=BLANK, reduction="mean", zero_infinity=True
        )
        return loss, int(batch[0].shape[0])

    def evaluate_examples(self, model: nn.Module, batches) -> tuple[dict[str, float], Tensor]:
        was_training = model.training
        model.eval()
        rows: list[tuple[int, int]] = []  # (digit errors, reference digits) per utterance
        try:
            with torch.no_grad():
                for batch in batches:
                    logits, out_lengths = self._forward(model, batch)
                    hyps = greedy_decode(logits, out_lengths)
                    for b, hyp in enumerate(hyps):
                        ref = batch[2][b, : int(batch[3][b])].tolist()
                        rows.append((edit_distance(ref, hyp), len(ref)))
        finally:
            model.train(was_training)
        counts = torch.tensor(rows, dtype=torch.float64).reshape(-1, 2)
        metrics = {
            "digit_error_rate": self.metric_from_counts(counts.sum(0)),
            "string_accuracy": 100.0 * sum(d == 0 for d, _ in rows) / max(len(rows), 1),
        }
        return metrics, counts

    def metric_from_counts(self, totals: Tensor) -> float:
        return percentage(totals)
