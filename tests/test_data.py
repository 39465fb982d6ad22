import datetime
import re

import pytest
import torch

from fused_s2s.demo.data import (BOS, EOS, PAD, SPECIALS, UNK, Vocab, batches, build_vocabs, date_task, date_vocabs,
                            encode_sources, make_batch, training_batches)

# Every way the task writes a date, as strptime formats (after the ordinal/"the ... of" words
# are dropped); strptime matches month and weekday names in any letter case.
STRPTIME_FORMATS = ("%d %B %Y", "%B %d %Y", "%d %b %Y", "%b %d %Y", "%d.%m.%Y", "%m/%d/%Y", "%Y/%m/%d",
                    "%Y%m%d", "%d-%b-%Y", "%A %d %B %Y", "%a %b %d %Y")


def parse_all(text):
    """Every date that some format reads in `text`."""
    text = re.sub(r"^the (\d+)(st|nd|rd|th) of ", r"\1 ", text, flags=re.I)
    text = re.sub(r"(\d+)(st|nd|rd|th)\b", r"\1", text, flags=re.I).replace(",", "")
    found = set()
    for fmt in STRPTIME_FORMATS:
        try:
            found.add(datetime.datetime.strptime(text, fmt).date())
        except ValueError:
            pass
    return found


def test_every_source_names_exactly_its_target_date():
    train, test = date_task(3000, 500, seed=3)
    for source, target in train + test:
        assert parse_all(source) == {datetime.date.fromisoformat(target)}, source


def test_task_is_deterministic_and_held_out_by_day():
    train, test = date_task(2000, 300, seed=7)
    assert (train, test) == date_task(2000, 300, seed=7)
    assert date_task(2000, 300, seed=8) != (train, test)
    assert len(train) == 2000 and len(test) == 300
    assert not {t for _, t in train} & {t for _, t in test}
    assert len({t for _, t in test}) == 300
    assert len({len(s) for s, _ in train}) > 10  # many surface forms


def test_task_bad_sizes():
    with pytest.raises(ValueError, match="num_train"):
        date_task(0, 10)
    with pytest.raises(ValueError, match="num_test"):
        date_task(10, 10 ** 6)


def test_vocab_round_trip_and_specials(tmp_path):
    vocab = Vocab.build(["hello world", "abc"])
    assert vocab.itos[:4] == list(SPECIALS) and (PAD, BOS, EOS, UNK) == (0, 1, 2, 3)
    ids = vocab.encode("hello", bos=True)
    assert ids[0] == BOS and ids[-1] == EOS and len(ids) == 7
    assert vocab.decode(ids) == "hello"
    assert vocab.decode(vocab.encode("held") + vocab.encode("xyz")) == "held"  # stops at the first EOS
    assert vocab.encode("z?", eos=False) == [UNK, UNK]
    assert vocab.decode(torch.tensor([PAD, vocab.stoi["a"], PAD])) == "a"
    vocab.save(tmp_path / "v.json")
    assert Vocab.load(tmp_path / "v.json") == vocab
    with pytest.raises(TypeError, match="text"):
        vocab.encode(3)
    with pytest.raises(ValueError, match="unique"):
        Vocab(["a", "a"])


def test_date_vocabs_cover_the_task():
    src_vocab, tgt_vocab = date_vocabs()
    train, test = date_task(5000, 500, seed=11)
    for source, target in train + test:
        assert UNK not in src_vocab.encode(source) and UNK not in tgt_vocab.encode(target)
    assert build_vocabs(train)[1] == tgt_vocab


def test_make_batch_pads_and_shifts():
    vocab = Vocab.build("abcdef")
    pairs = [("abc", "de"), ("a", "defed")]
    b = make_batch(pairs, vocab, vocab)
    assert b.src.tolist() == [vocab.encode("abc"), vocab.encode("a") + [PAD] * 2]
    assert b.src_lengths.tolist() == [4, 2]
    assert b.tgt_in[:, 0].tolist() == [BOS, BOS]
    assert b.tgt_out.tolist()[0] == vocab.encode("de") + [PAD] * 3
    assert b.tgt_in[1, 1:].tolist() == b.tgt_out[1, :-1].tolist()  # shifted by one
    assert b.num_tgt_tokens == 3 + 6 and b.num_src_tokens == 6 and len(b) == 2
    halves = b.split(2)
    assert [len(h) for h in halves] == [1, 1] and torch.equal(halves[1].src, b.src[1:])
    src, lengths = encode_sources(["ab", "abcd"], vocab)
    assert src.shape == (2, 5) and lengths.tolist() == [3, 5]
    with pytest.raises(ValueError, match="pairs"):
        make_batch([], vocab, vocab)


def test_batch_iterators():
    src_vocab, tgt_vocab = date_vocabs()
    pairs, _ = date_task(500, 10, seed=1)
    ordered = list(batches(pairs, src_vocab, tgt_vocab, 64))
    assert [len(b) for b in ordered] == [64] * 7 + [52]
    stream = training_batches(pairs, src_vocab, tgt_vocab, 50, seed=5, bucket=4)
    epoch = [next(stream) for _ in range(10)]  # 500 pairs = one epoch of 10 batches
    assert all(len(b) == 50 for b in epoch)
    seen = sorted(tgt_vocab.decode(row) for b in epoch for row in b.tgt_out)
    assert seen == sorted(t for _, t in pairs)
    again = training_batches(pairs, src_vocab, tgt_vocab, 50, seed=5, bucket=4)
    assert all(torch.equal(next(again).src, b.src) for b in epoch)
    # bucketing keeps lengths within a batch close
    spread = sum(int(b.src_lengths.max() - b.src_lengths.min()) for b in epoch) / len(epoch)
    assert spread < 8
    with pytest.raises(ValueError, match="batch_size"):
        next(training_batches(pairs, src_vocab, tgt_vocab, 0))
    with pytest.raises(ValueError, match="batch_size"):
        next(training_batches(pairs[:3], src_vocab, tgt_vocab, 4))
