import hashlib
import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.data import (
    FILE_SEPARATOR,
    DataConfig,
    ShardSampler,
    heldout_batches,
    load_corpus,
    markov_entropy_rate,
    shard_bounds,
    split_heldout,
    stdlib_files,
)


def test_stdlib_files_exclude_tests_and_third_party():
    files = stdlib_files()
    assert list(files) == sorted(files)
    assert "os.py" in files and "json/decoder.py" in files and "unittest/case.py" in files
    for rel in files:
        parts = rel.split("/")
        assert rel.endswith(".py")
        assert not {"test", "tests", "idle_test", "site-packages", "dist-packages"} & set(parts[:-1]), rel
    assert not any(rel.startswith(("test/", "lib2to3/tests/", "idlelib/idle_test/")) for rel in files)


def test_stdlib_hash_matches_independent_concatenation():
    max_bytes = 50_000
    root = Path(sysconfig.get_paths()["stdlib"])
    blob = b""
    for rel in stdlib_files():
        blob += (root / rel).read_bytes() + b"\n\n"
        if len(blob) >= max_bytes:
            break
    blob = blob[:max_bytes]

    corpus = load_corpus(DataConfig(max_bytes=max_bytes, heldout_fraction=0.1), seed=0)
    assert corpus.n_bytes == max_bytes
    assert corpus.sha256 == hashlib.sha256(blob).hexdigest()
    assert bytes(corpus.train) + bytes(corpus.heldout) == blob
    assert len(corpus.heldout) == 5_000 and len(corpus.train) == 45_000
    assert corpus.entropy_rate_nats is None
    # The seed must not change real text.
    assert load_corpus(DataConfig(max_bytes=max_bytes), seed=7).sha256 == corpus.sha256


def test_heldout_split_sizes_are_exact():
    data = np.arange(100, dtype=np.uint8)
    for fraction, n_heldout in [(0.05, 5), (0.29, 29), (0.0, 0), (0.5, 50)]:
        train, heldout = split_heldout(data, fraction)
        assert (len(train), len(heldout)) == (100 - n_heldout, n_heldout)
        assert np.array_equal(np.concatenate([train, heldout]), data)  # held-out bytes are the contiguous tail


def test_text_corpus_from_folder_reads_files_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_bytes(b"second")
    (tmp_path / "a.txt").write_bytes("first \u00e9".encode("latin-1"))  # not UTF-8: read as bytes regardless
    (tmp_path / ".hidden").write_bytes(b"skip me")
    corpus = load_corpus(DataConfig(corpus="text", path=str(tmp_path), heldout_fraction=0.0), seed=0)
    expected = b"first \xe9" + FILE_SEPARATOR + b"second" + FILE_SEPARATOR
    assert bytes(corpus.train) == expected
    assert corpus.sha256 == hashlib.sha256(expected).hexdigest()
    assert corpus.n_bytes == len(expected) == 17

    truncated = load_corpus(DataConfig(corpus="text", path=str(tmp_path), max_bytes=9, heldout_fraction=0.0), 0)
    assert bytes(truncated.train) == b"first \xe9\n\n"

    single = load_corpus(DataConfig(corpus="text", path=str(tmp_path / "b.txt"), heldout_fraction=0.0), 0)
    assert bytes(single.train) == b"second"


def test_text_corpus_errors_name_data_path(tmp_path):
    with pytest.raises(ValueError, match=r"data\.path: .* does not exist"):
        load_corpus(DataConfig(corpus="text", path=str(tmp_path / "missing")), seed=0)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"data\.path: .* no bytes"):
        load_corpus(DataConfig(corpus="text", path=str(tmp_path / "empty.txt")), seed=0)
    with pytest.raises(ValueError, match=r"data\.path: required"):
        load_corpus(DataConfig(corpus="text"), seed=0)


def test_markov_entropy_rate_two_state_chain():
    P = np.array([[0.9, 0.1], [0.5, 0.5]])
    h_row0 = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    expected = 5 / 6 * h_row0 + 1 / 6 * math.log(2)
    assert markov_entropy_rate(P) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.3864, abs=1e-4)


def _empirical_conditional_entropy(data: np.ndarray) -> float:
    counts = np.zeros((256, 256))
    np.add.at(counts, (data[:-1], data[1:]), 1)
    rows = counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        cond = np.where(counts > 0, counts * np.log(counts / rows), 0.0)
    return float(-cond.sum() / counts.sum())


def test_synthetic_corpus_matches_its_entropy_rate():
    cfg = DataConfig(corpus="synthetic", synthetic_bytes=1_000_000, heldout_fraction=0.0)
    corpus = load_corpus(cfg, seed=3)
    assert corpus.n_bytes == 1_000_000
    assert set(np.unique(corpus.train).tolist()) <= set(b"abcdefghijklmnop")
    assert 0.0 < corpus.entropy_rate_nats < math.log(16)
    assert _empirical_conditional_entropy(corpus.train) == pytest.approx(corpus.entropy_rate_nats, rel=0.02)

    again = load_corpus(cfg, seed=3)
    other = load_corpus(cfg, seed=4)
    assert again.sha256 == corpus.sha256
    assert other.sha256 != corpus.sha256 and other.entropy_rate_nats != corpus.entropy_rate_nats


def test_shard_bounds_equal_disjoint():
    assert shard_bounds(10, 3) == [(0, 3), (3, 6), (6, 9)]
    assert shard_bounds(8, 1) == [(0, 8)]


def test_sampler_is_deterministic_and_yields_shifted_targets():
    train = np.frombuffer(bytes(range(256)) * 40, dtype=np.uint8)
    a = ShardSampler(train, worker=1, n_workers=4, batch_size=8, seq_len=16, seed=5)
    b = ShardSampler(train, worker=1, n_workers=4, batch_size=8, seq_len=16, seed=5)
    for _ in range(3):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert xa.shape == ya.shape == (8, 16) and xa.dtype == torch.int64
    assert torch.equal(xa[:, 1:], ya[:, :-1])
    # train[i] = i mod 256, so every window must be the consecutive run starting at its recorded offset.
    assert torch.equal(xa[:, 0], torch.from_numpy(a.last_offsets % 256))
    assert torch.equal(ya, (xa + 1) % 256)

    c = ShardSampler(train, worker=1, n_workers=4, batch_size=8, seq_len=16, seed=6)
    assert not torch.equal(c.next_batch()[0], ShardSampler(train, 1, 4, 8, 16, seed=5).next_batch()[0])


def test_workers_sample_only_inside_their_own_shard():
    n_workers, seq_len = 3, 32
    train = np.zeros(10_000, dtype=np.uint8)
    assert shard_bounds(len(train), n_workers) == [(0, 3333), (3333, 6666), (6666, 9999)]
    for w, (lo, hi) in enumerate(shard_bounds(len(train), n_workers)):
        sampler = ShardSampler(train, w, n_workers, batch_size=64, seq_len=seq_len, seed=0)
        offsets = np.concatenate([sampler.sample_offsets() for _ in range(50)])
        assert offsets.min() >= lo and offsets.max() + seq_len + 1 <= hi

    # Shards of 41 bytes leave exactly 41 - 33 + 1 = 9 window starts each; all of them, and nothing else, get drawn.
    small = np.zeros(3 * 41 + 2, dtype=np.uint8)
    for w in range(n_workers):
        sampler = ShardSampler(small, w, n_workers, batch_size=64, seq_len=seq_len, seed=0)
        offsets = np.concatenate([sampler.sample_offsets() for _ in range(10)])
        assert sorted(set(offsets.tolist())) == list(range(41 * w, 41 * w + 9))


def test_sampler_resumes_from_state_dict():
    train = np.frombuffer(bytes(range(256)) * 20, dtype=np.uint8)
    original = ShardSampler(train, 0, 2, 4, 8, seed=1)
    original.next_batch()
    state = original.state_dict()
    expected = [original.next_batch() for _ in range(2)]

    resumed = ShardSampler(train, 0, 2, 4, 8, seed=1)
    resumed.load_state_dict(state)
    assert resumed.batches_drawn == 1
    for (x, y), (ex, ey) in zip([resumed.next_batch() for _ in range(2)], expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    with pytest.raises(ValueError, match="worker"):
        ShardSampler(train, 1, 2, 4, 8, seed=1).load_state_dict(state)


def test_sampler_rejects_shards_shorter_than_a_window():
    with pytest.raises(ValueError, match=r"data: .* 4 workers gets a 25-byte shard"):
        ShardSampler(np.zeros(100, dtype=np.uint8), 0, 4, batch_size=2, seq_len=25, seed=0)


def test_heldout_batches_are_evenly_spaced_and_clamped():
    heldout = np.frombuffer(bytes(range(200)), dtype=np.uint8)
    batches = heldout_batches(heldout, batch_size=2, seq_len=9, n_batches=3)
    assert len(batches) == 3
    starts = [int(x[i, 0]) for x, _ in batches for i in range(2)]
    assert starts == [0, 38, 76, 114, 152, 190]  # linspace(0, 200 - 10, 6); last window ends exactly at the end
    assert torch.equal(batches[0][1][1], torch.arange(39, 48))
    assert heldout_batches(heldout, 2, 9, 3)[2][0].tolist() == batches[2][0].tolist()

    # Only 20 non-overlapping windows fit, so 3 batches of 8 shrink to 2.
    assert len(heldout_batches(heldout, batch_size=8, seq_len=9, n_batches=3)) == 2
    # Fewer windows than one batch: still one batch, windows overlapping.
    (x, _), = heldout_batches(heldout[:15], batch_size=4, seq_len=9, n_batches=5)
    assert x[:, 0].tolist() == [0, 2, 3, 5]
    with pytest.raises(ValueError, match=r"data\.heldout_fraction"):
        heldout_batches(heldout[:9], batch_size=1, seq_len=9, n_batches=1)


def test_a_sampler_skipped_to_k_batches_reads_on_as_one_that_drew_them():
    """A restarted lockstep peer's sampler (cluster.real.lockstep_peer): it reads on where the run is."""
    train = np.frombuffer(bytes(range(256)) * 40, dtype=np.uint8)
    drew = ShardSampler(train, worker=2, n_workers=4, batch_size=4, seq_len=8, seed=3)
    for _ in range(5):
        drew.next_batch()
    skipped = ShardSampler(train, worker=2, n_workers=4, batch_size=4, seq_len=8, seed=3)
    skipped.skip_to(5)
    assert skipped.batches_drawn == 5
    fresh = ShardSampler(train, worker=2, n_workers=4, batch_size=4, seq_len=8, seed=3)
    (x, _), (y, _), (first, _) = drew.next_batch(), skipped.next_batch(), fresh.next_batch()
    assert torch.equal(x, y) and not torch.equal(y, first)
