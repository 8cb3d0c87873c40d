"""Byte-level corpora (vocab 256) and per-worker shards, fully determined by the seed.

Every run of an experiment, decentralized or baseline, must see the same bytes in the same split, so a corpus is
identified by its sha256 (written into the run manifest) and every random choice comes from a seeded numpy Generator.
"""

from __future__ import annotations

import functools
import hashlib
import os
import string
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer.settings import ConfigError, setting

# Files are joined with a blank line so that one module's last line never fuses with the next module's first.
FILE_SEPARATOR = b"\n\n"

_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


CORPORA = ("stdlib", "text", "synthetic")


@dataclass(frozen=True)
class DataConfig:
    corpus: str = setting("stdlib", "stdlib: this Python's standard library source; text: the files at path; "
                          "synthetic: a seeded Markov source with a known entropy rate", choices=CORPORA)
    path: str | None = setting(None, "file or folder of text, for corpus = 'text'")
    max_bytes: int | None = setting(None, "use at most this many bytes of the corpus (default: all)", low=1024)
    heldout_fraction: float = setting(0.05, "share of the corpus, at its end, held out for evaluation", low=0.0,
                                      high=0.5, low_open=True)
    synthetic_symbols: int = setting(16, "synthetic: alphabet size", low=2, high=256)
    synthetic_bytes: int = setting(2_000_000, "synthetic: bytes generated", low=10_000)
    synthetic_concentration: float = setting(0.1, "synthetic: Dirichlet concentration of each transition row "
                                             "(small: nearly deterministic)", low=0.0, high=1e3, low_open=True)

    def check(self) -> None:
        """Raise ValueError('field: ...') for a path that the corpus cannot use."""
        if self.corpus != "text":
            if self.path is not None:
                raise ValueError(f"path: only used with corpus = 'text', not {self.corpus!r}; remove it or set "
                                 "data.corpus = 'text'")
        elif self.path is None:
            raise ValueError("path: corpus 'text' needs a path to a file or folder of text")
        elif not Path(self.path).exists():
            raise ValueError(f"path: {self.path!r} does not exist; give a file or folder of text")


@dataclass(frozen=True)
class Corpus:
    name: str
    train: np.ndarray  # uint8, read-only
    heldout: np.ndarray  # uint8, read-only; the last bytes of the corpus, never seen in training
    sha256: str  # of the whole byte string before the split
    n_bytes: int
    description: str
    entropy_rate_nats: float | None  # loss floor per byte where the source is known (synthetic), else None


def load_corpus(cfg: DataConfig, seed: int) -> Corpus:
    entropy_rate = None
    if cfg.corpus == "stdlib":
        data = _stdlib_bytes(cfg.max_bytes)
        description = (f"Python {sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro} "
                       f"standard library source ({len(stdlib_files())} files, tests excluded)")
    elif cfg.corpus == "text":
        data, n_files = _text_bytes(cfg.path, cfg.max_bytes)
        description = f"text from {cfg.path} ({n_files} file{'s' if n_files != 1 else ''})"
    elif cfg.corpus == "synthetic":
        data, entropy_rate = _synthetic_bytes(cfg.synthetic_symbols, cfg.synthetic_bytes,
                                              cfg.synthetic_concentration, seed)
        if cfg.max_bytes is not None:
            data = data[: cfg.max_bytes]
        description = (f"first-order Markov source, {cfg.synthetic_symbols} symbols, "
                       f"Dirichlet({cfg.synthetic_concentration}) rows, seed {seed}")
    else:
        raise ConfigError(f"data.corpus: unknown corpus {cfg.corpus!r}; use 'stdlib', 'text' or 'synthetic'")

    train, heldout = split_heldout(np.frombuffer(data, dtype=np.uint8), cfg.heldout_fraction)
    return Corpus(name=cfg.corpus, train=train, heldout=heldout, sha256=hashlib.sha256(data).hexdigest(),
                  n_bytes=len(data), description=description, entropy_rate_nats=entropy_rate)


def split_heldout(data: np.ndarray, heldout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    # round, not floor: 0.29 * 100 is 28.999... in floating point and should still hold out 29 bytes.
    n_heldout = round(len(data) * heldout_fraction)
    assert 0 <= n_heldout <= len(data)
    # Contiguous tail rather than random windows, so no held-out byte is also inside some training window.
    return data[: len(data) - n_heldout], data[len(data) - n_heldout:]


# ---------------------------------------------------------------------------------------------------------------- stdlib

def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=1)
def stdlib_files() -> tuple[str, ...]:
    """Relative POSIX paths of the standard library's own modules, sorted, tests and third-party packages excluded."""
    root = stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        # config-3.x-<platform>/ and _sysconfigdata_*.py record this build's install prefix and compiler flags; dropping
        # them lets two machines with the same Python version produce the same corpus hash.
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith("config-")]
        for name in filenames:
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                found.append((rel_dir / name).as_posix())
    return tuple(sorted(found))


@functools.lru_cache(maxsize=4)
def _stdlib_bytes(max_bytes: int | None) -> bytes:
    # Cached because several workers in one process ask for the same corpus.
    root = stdlib_root()
    return _concat_files([root / rel for rel in stdlib_files()], max_bytes)


def _concat_files(paths: list[Path], max_bytes: int | None) -> bytes:
    parts, total = [], 0
    for path in paths:
        if max_bytes is not None and total >= max_bytes:
            break
        chunk = path.read_bytes() + FILE_SEPARATOR
        parts.append(chunk)
        total += len(chunk)
    data = b"".join(parts)
    return data if max_bytes is None else data[:max_bytes]


# ------------------------------------------------------------------------------------------------------------------ text

def text_files(folder: Path) -> list[Path]:
    """Regular files under `folder`, sorted by relative POSIX path; hidden entries (.git, .DS_Store) are skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            full = Path(dirpath) / name
            if not name.startswith(".") and full.is_file():
                found.append(full)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _text_bytes(path: str | None, max_bytes: int | None) -> tuple[bytes, int]:
    if path is None:
        raise ConfigError("data.path: required when data.corpus = 'text'; give a file or folder of text")
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"data.path: {path!r} does not exist; give a file or folder of text")
    try:
        files = text_files(p) if p.is_dir() else [p]
        data = _concat_files(files, max_bytes) if p.is_dir() else p.read_bytes()[:max_bytes]
    except OSError as e:
        raise ConfigError(f"data.path: {path!r} cannot be read ({e.strerror or e}); give a readable file or folder "
                          "of text") from None
    if not data:
        raise ConfigError(f"data.path: {path!r} holds no bytes; give a non-empty file or folder of text")
    for f in files:
        _check_text(f, path)
    return data, len(files)


def _check_text(file: Path, path: str) -> None:
    """Refuse a file that is not text: the model is byte-level and would train on anything, but a corpus of images or
    archives is a wrong path, not an experiment, and its results would be meaningless beside a text run."""
    head = file.read_bytes()[:_TEXT_PROBE_BYTES]
    if b"\0" in head:
        raise ConfigError(f"data.path: {str(file)!r} looks binary (it holds NUL bytes); give text files only, or a "
                          f"folder without it ({path!r})")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # a multi-byte character cut by the probe's end is still text
            raise ConfigError(f"data.path: {str(file)!r} is not UTF-8 text (byte {e.start}); give text files only, "
                              f"or a folder without it ({path!r})") from None


_TEXT_PROBE_BYTES = 1 << 16


def check_fits(corpus: Corpus, n_workers: int, seq_len: int) -> None:
    """What the workers' samplers and held-out batches need of the corpus, checked before any worker starts."""
    shard = len(corpus.train) // n_workers
    if shard < seq_len + 1:
        raise ConfigError(
            f"data: the train split has {len(corpus.train)} bytes, so each of {n_workers} workers gets a {shard}-byte "
            f"shard, shorter than seq_len + 1 = {seq_len + 1}; use a larger corpus (data.max_bytes, "
            f"data.synthetic_bytes), fewer workers or a shorter model.block_size")
    if len(corpus.heldout) < seq_len + 1:
        raise ConfigError(f"data.heldout_fraction: the held-out split has {len(corpus.heldout)} bytes, fewer than "
                          f"seq_len + 1 = {seq_len + 1}; raise data.heldout_fraction or use a larger corpus")


# ------------------------------------------------------------------------------------------------------------- synthetic

def markov_entropy_rate(P: np.ndarray) -> float:
    """Entropy rate in nats of a stationary first-order Markov chain: sum_i pi_i * H(P_i)."""
    P = np.asarray(P, dtype=np.float64)
    pi = stationary_distribution(P)
    with np.errstate(divide="ignore", invalid="ignore"):
        row_entropy = -np.where(P > 0, P * np.log(P), 0.0).sum(axis=1)
    return float(pi @ row_entropy)


def stationary_distribution(P: np.ndarray) -> np.ndarray:
    P = np.asarray(P, dtype=np.float64)
    k = P.shape[0]
    assert P.shape == (k, k) and np.allclose(P.sum(axis=1), 1.0)
    # pi (P - I) = 0 with sum(pi) = 1, solved as one overdetermined system so no eigenvector needs normalising.
    a = np.vstack([P.T - np.eye(k), np.ones((1, k))])
    b = np.zeros(k + 1)
    b[-1] = 1.0
    pi = np.linalg.lstsq(a, b, rcond=None)[0]
    pi = np.clip(pi, 0.0, None)
    return pi / pi.sum()


def synthetic_alphabet(n_symbols: int) -> bytes:
    # Printable characters first so a sample of the corpus can be read in a report.
    printable = (string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation).encode()
    rest = bytes(b for b in range(256) if b not in printable)
    assert 2 <= n_symbols <= 256
    return (printable + rest)[:n_symbols]


def synthetic_transitions(n_symbols: int, concentration: float, rng: np.random.Generator) -> np.ndarray:
    return rng.dirichlet(np.full(n_symbols, concentration), size=n_symbols)


@functools.lru_cache(maxsize=4)
def _synthetic_bytes(n_symbols: int, n_bytes: int, concentration: float, seed: int) -> tuple[bytes, float]:
    rng = np.random.default_rng(seed)
    P = synthetic_transitions(n_symbols, concentration, rng)
    pi = stationary_distribution(P)

    # Walking the chain one step at a time is inherently sequential. Each state's successors are pre-drawn in bulk
    # (vectorised), so the Python loop only pops from per-state stacks; this is the same chain in distribution.
    def draw(state: int, count: int) -> list[int]:
        return rng.choice(n_symbols, size=count, p=P[state]).tolist()

    stacks = [draw(i, int(pi[i] * n_bytes * 1.1) + 64) for i in range(n_symbols)]
    pos = [0] * n_symbols
    out = bytearray(n_bytes)
    state = int(rng.choice(n_symbols, p=pi))
    for t in range(n_bytes):
        out[t] = state
        try:
            nxt = stacks[state][pos[state]]
        except IndexError:  # rare: this state was visited more often than its stationary share predicted
            stacks[state] = draw(state, n_bytes // n_symbols + 64)
            pos[state] = 0
            nxt = stacks[state][0]
        pos[state] += 1
        state = nxt
    data = bytes(out).translate(synthetic_alphabet(n_symbols) + bytes(256 - n_symbols))
    return data, markov_entropy_rate(P)


# ---------------------------------------------------------------------------------------------------------------- shards

def shard_bounds(n_bytes: int, n_workers: int) -> list[tuple[int, int]]:
    """Disjoint contiguous [start, end) ranges of equal length; the remainder at the end is left unused."""
    assert n_workers >= 1 and n_bytes >= 0
    length = n_bytes // n_workers
    return [(w * length, (w + 1) * length) for w in range(n_workers)]


def _windows(data: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    block = torch.from_numpy(data[idx].astype(np.int64))
    return block[:, :-1].contiguous(), block[:, 1:].contiguous()


class ShardSampler:
    """Random (x, y) windows for one worker, drawn only from that worker's own contiguous shard of the train bytes.

    Disjoint shards mimic far-flung peers that each hold their own data; the generator is seeded by
    (seed, worker, n_workers) so a worker's stream does not depend on what the others have drawn.
    """

    def __init__(self, train: np.ndarray, worker: int, n_workers: int, batch_size: int, seq_len: int, seed: int):
        assert 0 <= worker < n_workers and batch_size >= 1 and seq_len >= 1
        self.train = train
        self.worker, self.n_workers = worker, n_workers
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.shard = shard_bounds(len(train), n_workers)[worker]
        shard_len = self.shard[1] - self.shard[0]
        if shard_len < seq_len + 1:
            raise ValueError(
                f"data: the train split has {len(train)} bytes, so each of {n_workers} workers gets a {shard_len}-byte "
                f"shard, shorter than seq_len + 1 = {seq_len + 1}; use a larger corpus (data.max_bytes, "
                f"data.synthetic_bytes), fewer workers or a shorter seq_len")
        self._rng = np.random.default_rng([seed, worker, n_workers])
        self.batches_drawn = 0
        self.last_offsets: np.ndarray | None = None

    def sample_offsets(self) -> np.ndarray:
        """Start offsets (into `train`) of the next batch's windows; advances the stream like next_batch does."""
        lo, hi = self.shard
        offsets = self._rng.integers(lo, hi - self.seq_len, size=self.batch_size)  # window [o, o + seq_len] fits
        self.batches_drawn += 1
        self.last_offsets = offsets
        return offsets

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _windows(self.train, self.sample_offsets(), self.seq_len)

    def skip_to(self, batches_drawn: int) -> None:
        """Draw on until `batches_drawn` batches have been drawn: the stream a sampler that had drawn them goes on
        with (a restarted peer reads its shard on from where the run is, not from the start)."""
        assert batches_drawn >= self.batches_drawn, "a sampler does not go back"
        while self.batches_drawn < batches_drawn:
            self.sample_offsets()

    def state_dict(self) -> dict:
        return {"rng": self._rng.bit_generator.state, "batches_drawn": self.batches_drawn,
                "worker": self.worker, "n_workers": self.n_workers, "seed": self.seed,
                "batch_size": self.batch_size, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        for key in ("worker", "n_workers", "seed", "batch_size", "seq_len"):
            if state[key] != getattr(self, key):
                raise ValueError(f"data: checkpoint was saved by a sampler with {key}={state[key]}, this one has "
                                 f"{key}={getattr(self, key)}; resume with the run's original settings")
        self._rng.bit_generator.state = state["rng"]
        self.batches_drawn = state["batches_drawn"]


def heldout_batches(heldout: np.ndarray, batch_size: int, seq_len: int,
                    n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Evenly spaced windows over the held-out bytes, the same on every worker and every run."""
    assert batch_size >= 1 and seq_len >= 1 and n_batches >= 1
    window = seq_len + 1
    if len(heldout) < window:
        raise ValueError(f"data.heldout_fraction: the held-out split has {len(heldout)} bytes, fewer than "
                         f"seq_len + 1 = {window}; raise data.heldout_fraction or use a larger corpus")
    # As many batches as fit without windows overlapping, but always one, so evaluation always has something to score.
    n_batches = max(1, min(n_batches, (len(heldout) // window) // batch_size))
    starts = np.linspace(0, len(heldout) - window, num=n_batches * batch_size).round().astype(np.int64)
    return [_windows(heldout, starts[b * batch_size:(b + 1) * batch_size], seq_len) for b in range(n_batches)]
