"""One measurement in a fresh process, so that nothing an earlier measurement left behind counts in it.

A process keeps much of what it has freed, and its memory counts in whatever it measures next: glibc's heap keeps
freed blocks for reuse rather than hand them back (the plain PyTorch run at batch N*b leaves hundreds of MB: 900 MB
for `small` at N = 16), and the pages of Ray's object store that a driver once read stay mapped in it after their
objects are gone. Measured in one process, a run after a larger one looked bigger by that much, and the growth per
worker between two N took in the plain runs' leftovers, which grow with N. Each run in a process of its own (spawned:
a fresh interpreter, not a fork of this one) holds only what it makes.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import traceback
from collections.abc import Callable
from typing import Any


def _child(results, fn: Callable[..., Any], args: tuple) -> None:
    try:
        results.put(("ok", fn(*args)))
    except BaseException:  # the parent reports it; nothing else would see it
        results.put(("error", traceback.format_exc()))


def in_fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` in a spawned process; its return value (picklable), or RuntimeError with the child's traceback,
    or with its exit status where it died without answering (killed for memory, say)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(target=_child, args=(results, fn, args))
    child.start()
    try:
        while True:
            try:
                status, value = results.get(timeout=5.0)
                break
            except queue.Empty:
                if not child.is_alive():
                    raise RuntimeError(f"{fn.__name__} died without an answer (exit status {child.exitcode})") from None
    finally:
        child.join(timeout=60)
        if child.is_alive():
            child.kill()
            child.join()
    if status == "error":
        raise RuntimeError(f"{fn.__name__} failed:\n{value}")
    return value
