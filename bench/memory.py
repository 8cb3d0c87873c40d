"""What a run holds in memory: sampled memory of a process tree, and what one replica should hold.

Memory is summed over this process and all its descendants (Ray's daemons and actors when Ray was started here, the
worker processes of the gloo baseline), sampled in a background thread, in two ways. Resident memory (RSS) counts a
shared page once per process that maps it: torch's libraries, the corpus in Ray's object store, and every exchanged
tensor, which an actor writes into the store, the store holds and the driver maps, so the RSS sum counts each
exchanged byte up to three times, and that overstatement grows with the number of workers. The proportional set size
(PSS) splits each shared page among the processes that map it, so the PSS sum counts each page once: it is the
figure the growth per extra worker is judged on; the RSS sum is printed beside it.
"""

from __future__ import annotations

import threading

import psutil

from trainer.model import GPTConfig, count_params

MB = 1 << 20


def tree_memory_bytes(root: psutil.Process | None = None) -> tuple[int, int]:
    """(RSS, PSS) summed over `root` and its descendants."""
    root = root or psutil.Process()
    rss = pss = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            m = p.memory_full_info()
        except psutil.Error:  # exited meanwhile, or not ours to read
            continue
        rss += m.rss
        pss += getattr(m, "pss", m.rss)  # PSS is Linux's; elsewhere RSS stands in
    return rss, pss


def tree_rss_bytes(root: psutil.Process | None = None) -> int:
    return tree_memory_bytes(root)[0]


class PeakRss:
    """`with PeakRss() as peak:` ... `peak.bytes`, `peak.pss_bytes`: the largest sums of RSS and of PSS seen inside."""

    # Reading PSS parses every mapping of every process in the tree (Ray's workers included): at 0.1 s it took a
    # core's worth of time from the 2-core machine it measured, the plain PyTorch run first of all.
    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self.bytes = self.pss_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _take(self) -> None:
        rss, pss = tree_memory_bytes()
        self.bytes, self.pss_bytes = max(self.bytes, rss), max(self.pss_bytes, pss)

    def _sample(self) -> None:
        while True:
            self._take()
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self):
        self._take()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._take()


# float32 copies of the parameter vector each replica keeps, beyond the parameters themselves, by algorithm.
STRATEGY_COPIES = {"ddp": 0, "diloco": 2}  # DiLoCo: the shared (last synchronised) copy and the outer momentum


def replica_state_bytes(model: GPTConfig, algorithm: str) -> int:
    """Parameters + gradients + AdamW's two moments + the strategy's copies, in float32."""
    return 4 * count_params(model) * (1 + 1 + 2 + STRATEGY_COPIES[algorithm])
