"""The embedded task, the vocabulary and batching.

The task: dates written many ways ("Friday, 12 March 2021", "03/12/2021", "12-MAR-2021",
"the 12th of march, 2021", ...) -> ISO dates ("2021-03-12"). It is generated on the fly from a
seed, needs no download, and needs attention: the year, month and day have to be found at
positions that move with the format, and month names have to be read, not copied.
Held-out examples use calendar days that never occur in the training set.
"""
from __future__ import annotations

import datetime
import json
import random
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Sequence, Tuple

import torch
from torch import Tensor

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")

Pair = Tuple[str, str]


# ------------------------------------------------------------------------------ vocabulary


class Vocab:
    """Character-level vocabulary with the special tokens PAD=0, BOS=1, EOS=2, UNK=3."""

    def __init__(self, tokens: Iterable[str]):
        tokens = list(tokens)
        if tokens[: len(SPECIALS)] != list(SPECIALS):
            tokens = list(SPECIALS) + [t for t in tokens if t not in SPECIALS]
        if len(set(tokens)) != len(tokens):
            raise ValueError("tokens must be unique")
        self.itos: List[str] = tokens
        self.stoi: Dict[str, int] = {t: i for i, t in enumerate(tokens)}

    @classmethod
    def build(cls, texts: Iterable[str]) -> "Vocab":
        """A vocabulary holding every character of `texts` (sorted, so it is deterministic)."""
        return cls(sorted({ch for text in texts for ch in text}))

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and other.itos == self.itos

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)})"

    def encode(self, text: str, *, bos: bool = False, eos: bool = True) -> List[int]:
        """Token ids of `text`; unknown characters map to UNK."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = [self.stoi.get(ch, UNK) for ch in text]
        return ([BOS] if bos else []) + ids + ([EOS] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`, stopping at the first EOS and skipping PAD and BOS."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        out = []
        for i in ids:
            if i == EOS:
                break
            if i in (PAD, BOS):
                continue
            out.append(self.itos[i] if 0 <= i < len(self.itos) else SPECIALS[UNK])
        return "".join(out)

    def to_dict(self) -> dict:
        return {"tokens": self.itos}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocab":
        return cls(d["tokens"])

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, ensure_ascii=False)

    @classmethod
    def load(cls, path: str) -> "Vocab":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


# ------------------------------------------------------------------------------ date task

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
FIRST_DAY = datetime.date(1900, 1, 1)
LAST_DAY = datetime.date(2099, 12, 31)


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _case(text: str, rng: random.Random) -> str:
    return rng.choice((str.lower, str.upper, str.title, str))(text)


# Each format takes (date, rng) and writes the date one way. None is ambiguous: numeric
# day/month orders are told apart by their separator ("/" month first, "." day first).
_FORMATS = (
    lambda d, r: f"{d.day} {_case(MONTHS[d.month - 1], r)} {d.year}",
    lambda d, r: f"{_case(MONTHS[d.month - 1], r)} {d.day}, {d.year}",
    lambda d, r: f"{d.day:02d} {_case(MONTHS[d.month - 1][:3], r)} {d.year}",
    lambda d, r: f"{_case(MONTHS[d.month - 1][:3], r)} {d.day} {d.year}",
    lambda d, r: f"{d.day:02d}.{d.month:02d}.{d.year}",
    lambda d, r: f"{d.day}.{d.month}.{d.year}",
    lambda d, r: f"{d.month:02d}/{d.day:02d}/{d.year}",
    lambda d, r: f"{d.month}/{d.day}/{d.year}",
    lambda d, r: f"{d.year}/{d.month:02d}/{d.day:02d}",
    lambda d, r: f"{d.year}{d.month:02d}{d.day:02d}",
    lambda d, r: f"{d.day:02d}-{MONTHS[d.month - 1][:3].upper()}-{d.year}",
    lambda d, r: _case(f"{WEEKDAYS[d.weekday()]}, {d.day} {MONTHS[d.month - 1]} {d.year}", r),
    lambda d, r: _case(f"{WEEKDAYS[d.weekday()][:3]} {MONTHS[d.month - 1][:3]} {d.day} {d.year}", r),
    lambda d, r: _case(f"the {_ordinal(d.day)} of {MONTHS[d.month - 1]}, {d.year}", r),
    lambda d, r: _case(f"{MONTHS[d.month - 1]} {_ordinal(d.day)} {d.year}", r),
)


def format_date(date: datetime.date, rng: random.Random) -> str:
    """`date` written one of the task's ways, picked (with its letter case) by `rng`."""
    return rng.choice(_FORMATS)(date, rng)


def date_pairs(days: Sequence[int], seed: int) -> List[Pair]:
    """(written date, ISO date) for each day, given as a day number counted from 1900-01-01."""
    rng = random.Random(seed)
    pairs = []
    for n in days:
        date = FIRST_DAY + datetime.timedelta(days=n)
        pairs.append((format_date(date, rng), date.isoformat()))
    return pairs


def date_task(num_train: int = 20000, num_test: int = 1000, seed: int = 0) -> Tuple[List[Pair], List[Pair]]:
    """(train, test) pairs of the date task, deterministic from `seed`.

    The test set is held out by calendar day: no test date occurs in the training set in any
    format. Training days may repeat (written differently) when num_train exceeds the days left.
    """
    for name, value in (("num_train", num_train), ("num_test", num_test)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    num_days = (LAST_DAY - FIRST_DAY).days + 1
    if num_test > num_days // 2:
        raise ValueError(f"num_test must be at most {num_days // 2}, got {num_test}")
    rng = random.Random(seed)
    days = list(range(num_days))
    rng.shuffle(days)
    test_days, train_days = days[:num_test], days[num_test:]
    train_days = [train_days[rng.randrange(len(train_days))] for _ in range(num_train)]
    return date_pairs(train_days, seed + 1), date_pairs(test_days, seed + 2)


# ------------------------------------------------------------------------------ batching


@dataclass
class Batch:
    """A padded batch: src (B,S), src_lengths (B,) int64; tgt_in = [BOS, y...] and
    tgt_out = [y..., EOS] (B,T), padded with PAD."""
    src: Tensor
    src_lengths: Tensor
    tgt_in: Tensor
    tgt_out: Tensor

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in
                       (self.src, self.src_lengths, self.tgt_in, self.tgt_out)))

    def __len__(self) -> int:
        return self.src.shape[0]

    @property
    def num_tgt_tokens(self) -> int:
        return int((self.tgt_out != PAD).sum())

    @property
    def num_src_tokens(self) -> int:
        return int(self.src_lengths.sum())

    def split(self, parts: int) -> List["Batch"]:
        """The batch cut into `parts` consecutive pieces along the batch dim (for DDP ranks)."""
        fields = [t.chunk(parts) for t in (self.src, self.src_lengths, self.tgt_in, self.tgt_out)]
        return [Batch(*f) for f in zip(*fields)]


def pad(seqs: Sequence[Sequence[int]], value: int = PAD) -> Tensor:
    """(len(seqs), longest) int64 tensor, right-padded with `value`."""
    out = torch.full((len(seqs), max(len(s) for s in seqs)), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def encode_sources(texts: Sequence[str], vocab: Vocab) -> Tuple[Tensor, Tensor]:
    """Padded source ids (B,S) and lengths (B,) for a list of texts (each ends with EOS)."""
    if len(texts) == 0:
        raise ValueError("texts must not be empty")
    ids = [vocab.encode(t) for t in texts]
    return pad(ids), torch.tensor([len(s) for s in ids], dtype=torch.long)


def make_batch(pairs: Sequence[Pair], src_vocab: Vocab, tgt_vocab: Vocab) -> Batch:
    """Encode and pad (source, target) pairs into a Batch."""
    if len(pairs) == 0:
        raise ValueError("pairs must not be empty")
    src, src_lengths = encode_sources([s for s, _ in pairs], src_vocab)
    tgt = [tgt_vocab.encode(t, bos=True, eos=True) for _, t in pairs]
    return Batch(src, src_lengths, pad([t[:-1] for t in tgt]), pad([t[1:] for t in tgt]))


def batches(pairs: Sequence[Pair], src_vocab: Vocab, tgt_vocab: Vocab, batch_size: int) -> Iterator[Batch]:
    """Batches of `pairs` in order (for evaluation); the last one may be smaller."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i in range(0, len(pairs), batch_size):
        yield make_batch(pairs[i: i + batch_size], src_vocab, tgt_vocab)


def training_batches(pairs: Sequence[Pair], src_vocab: Vocab, tgt_vocab: Vocab, batch_size: int,
                     seed: int = 0, bucket: int = 50) -> Iterator[Batch]:
    """Endless shuffled batches, one epoch after another.

    Sources of similar length go together (sorted within chunks of `bucket` batches) so that
    little compute is spent on padding; the batch order is shuffled again.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(pairs) < batch_size:
        raise ValueError(f"need at least batch_size={batch_size} pairs, got {len(pairs)}")
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    while True:
        rng.shuffle(order)
        chunk = batch_size * bucket
        groups = []
        for c in range(0, len(order) - batch_size + 1, chunk):
            part = sorted(order[c: c + chunk], key=lambda i: len(pairs[i][0]))
            groups += [part[i: i + batch_size] for i in range(0, len(part) - batch_size + 1, batch_size)]
        rng.shuffle(groups)
        for g in groups:
            yield make_batch([pairs[i] for i in g], src_vocab, tgt_vocab)


def build_vocabs(pairs: Iterable[Pair]) -> Tuple[Vocab, Vocab]:
    """(source vocab, target vocab) holding every character of the pairs."""
    pairs = list(pairs)
    return Vocab.build(s for s, _ in pairs), Vocab.build(t for _, t in pairs)


def date_vocabs() -> Tuple[Vocab, Vocab]:
    """Vocabularies covering every character the date task can write, whatever the seed."""
    days = [FIRST_DAY + datetime.timedelta(days=n) for n in range(366)]  # every month and weekday
    texts = [f(d, random.Random(0)) for d in days for f in _FORMATS]
    return Vocab.build(texts + [t.upper() for t in texts] + [t.lower() for t in texts]), Vocab.build("0123456789-")
