"""A small byte-pair-encoding (BPE) subword tokenizer, written here rather than imported.

Why our own: a hub tokenizer would need a download at run time (the project allows
none), the usual libraries are not dependencies, and a BPE is ~150 lines. Training is
deterministic (ties between equally frequent pairs go to the lexicographically smallest
pair), so the same text always gives the same vocabulary, and the tokenizer is saved as
a small JSON file next to the data cache.

Scheme (SentencePiece-like): whitespace is normalized to single spaces; a space is
written `▁` and glued to the front of the word that follows it (a space is added in
front of the text, so the first word looks like any other). The text is cut into words
(runs of letters/digits) and single punctuation marks, each with its `▁` when a space
preceded it. Merges never cross those pieces. Decoding concatenates the pieces and
turns `▁` back into spaces, so `decode(encode(t)) == t` for any whitespace-normalized
text whose characters were seen in training (others become `<unk>`).
"""

from __future__ import annotations

import heapq
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

from fourbit.io import atomic_write

SPACE = "▁"
PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
_PIECES = re.compile(r" ?\w+| ?[^\w\s]")
FORMAT_VERSION = 1


def normalize(text: str) -> str:
    """Whitespace runs become one space; no leading or trailing space."""
    return " ".join(text.split())


def pre_tokenize(text: str) -> list[str]:
    """The words BPE works inside: `▁`-prefixed runs of letters/digits and punctuation marks."""
    return [p.replace(" ", SPACE) for p in _PIECES.findall(" " + normalize(text))]


class BPE:
    """A trained tokenizer: `encode(text) -> ids`, `decode(ids) -> text`.

    Ids 0..3 are `<pad>`, `<s>`, `</s>`, `<unk>`; then the characters seen in training
    (sorted), then one token per merge, in the order the merges were learned.
    """

    def __init__(self, chars: Iterable[str], merges: Iterable[tuple[str, str]]):
        self.chars = sorted(set(chars))
        self.merges = [tuple(m) for m in merges]
        self.tokens = list(SPECIALS) + self.chars + [a + b for a, b in self.merges]
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        if len(self.ids) != len(self.tokens):
            raise ValueError("BPE vocabulary has duplicate tokens")
        self.ranks = {m: r for r, m in enumerate(self.merges)}
        self._cache: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    # -- training ------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> BPE:
        """Learn merges on `texts` until the vocabulary has `vocab_size` tokens (specials and
        characters included) or no pair occurs `min_frequency` times."""
        counts = Counter(w for t in texts for w in pre_tokenize(t))
        words = sorted(counts)  # a fixed order: the result never depends on hash seeds
        freq = [counts[w] for w in words]
        symbols = [list(w) for w in words]
        chars = sorted({c for w in words for c in w})
        if len(SPECIALS) + len(chars) > vocab_size:
            raise ValueError(
                f"vocab_size {vocab_size} is smaller than the {len(SPECIALS) + len(chars)} "
                "specials and characters of the training text"
            )
        pair_count: dict[tuple[str, str], int] = defaultdict(int)
        where: dict[tuple[str, str], set[int]] = defaultdict(set)
        for i, syms in enumerate(symbols):
            for pair in zip(syms, syms[1:], strict=False):
                pair_count[pair] += freq[i]
                where[pair].add(i)
        heap = [(-c, p) for p, c in pair_count.items()]
        heapq.heapify(heap)
        merges: list[tuple[str, str]] = []
        while len(SPECIALS) + len(chars) + len(merges) < vocab_size and heap:
            neg, pair = heapq.heappop(heap)
            if pair_count.get(pair, 0) != -neg:
                continue  # stale entry: the count changed and a fresh entry was pushed
            if -neg < min_frequency:
                break
            merges.append(pair)
            merged = pair[0] + pair[1]
            changed: set[tuple[str, str]] = set()
            for i in sorted(where.pop(pair)):
                syms = symbols[i]
                for p in zip(syms, syms[1:], strict=False):
                    pair_count[p] -= freq[i]
                    changed.add(p)
                out, j = [], 0
                while j < len(syms):
                    if j + 1 < len(syms) and syms[j] == pair[0] and syms[j + 1] == pair[1]:
                        out.append(merged)
                        j += 2
                    else:
                        out.append(syms[j])
                        j += 1
                symbols[i] = out
                for p in zip(out, out[1:], strict=False):
                    pair_count[p] += freq[i]
                    where[p].add(i)
                    changed.add(p)
            pair_count.pop(pair, None)
            for p in sorted(changed - {pair}):
                if pair_count[p] > 0:
                    heapq.heappush(heap, (-pair_count[p], p))
                else:
                    pair_count.pop(p)
                    where.pop(p, None)
        return cls(chars, merges)

    # -- encoding ------------------------------------------------------------------------
    def _encode_word(self, word: str) -> list[int]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        syms = list(word)
        while len(syms) > 1:
            ranked = [(self.ranks.get(p), k) for k, p in enumerate(zip(syms, syms[1:], strict=False))]
            ranked = [(r, k) for r, k in ranked if r is not None]
            if not ranked:
                break
            _, k = min(ranked)
            syms[k : k + 2] = [syms[k] + syms[k + 1]]
        ids = [self.ids.get(s, UNK) for s in syms]
        self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no `<s>` / `</s>`)."""
        return [i for w in pre_tokenize(text) for i in self._encode_word(w)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; specials other than `<unk>` are dropped, and decoding stops at `</s>`."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i in (PAD, BOS):
                continue
            out.append(self.tokens[i] if 0 <= i < len(self.tokens) else SPECIALS[UNK])
        return "".join(out).replace(SPACE, " ").strip()

    # -- files ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": "fourbit-bpe",
            "version": FORMAT_VERSION,
            "chars": self.chars,
            "merges": [list(m) for m in self.merges],
        }

    def save(self, path: str | Path) -> Path:
        text = json.dumps(self.to_dict(), ensure_ascii=False)
        return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    @classmethod
    def load(cls, path: str | Path) -> BPE:
        """Raises ValueError (with the path) when the file is not a saved BPE."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            if data.get("format") != "fourbit-bpe" or data.get("version") != FORMAT_VERSION:
                raise ValueError("not a fourbit BPE file of this version")
            merges = [tuple(m) for m in data["merges"]]
            if any(len(m) != 2 or not all(isinstance(s, str) for s in m) for m in merges):
                raise ValueError("malformed merges")
            return cls(data["chars"], merges)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"cannot read BPE file {path}: {e}") from None
