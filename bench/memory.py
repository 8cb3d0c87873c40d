"""What a run holds in memory: sampled resident memory of a process tree, and what one replica should hold.

Resident memory is summed over this process and all its descendants (Ray's daemons and actors when Ray was started
here, the worker processes of the gloo baseline), sampled in a background thread; shared pages (torch's libraries,
the corpus in Ray's object store) count once per process that maps them, so the sum overstates the machine's use,
but the overstatement is the same at every N and cancels in the growth per extra worker.
"""

from __future__ import annotations

import threading

import psutil

from trainer.model import GPTConfig, count_params

MB = 1 << 20


def tree_rss_bytes(root: psutil.Process | None = None) -> int:
    root = root or psutil.Process()
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # exited meanwhile
            pass
    return total


class PeakRss:
    """`with PeakRss() as peak:` ... `peak.bytes`: the largest sum of resident memory seen while inside."""

    def __init__(self, interval_s: float = 0.1):
        self.interval_s = interval_s
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self.bytes = max(self.bytes, tree_rss_bytes())
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self):
        self.bytes = tree_rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.bytes = max(self.bytes, tree_rss_bytes())


# float32 copies of the parameter vector each replica keeps, beyond the parameters themselves, by algorithm.
STRATEGY_COPIES = {"ddp": 0, "diloco": 2}  # DiLoCo: the shared (last synchronised) copy and the outer momentum


def replica_state_bytes(model: GPTConfig, algorithm: str) -> int:
    """Parameters + gradients + AdamW's two moments + the strategy's copies, in float32."""
    return 4 * count_params(model) * (1 + 1 + 2 + STRATEGY_COPIES[algorithm])
