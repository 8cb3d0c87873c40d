"""A lockstep arm's all-reduce over `torch.distributed` with gloo: the tightly interconnected baseline, for real.

hivemind's averager is what far-flung peers run; a datacenter's DDP is a plain ring all-reduce. With
`run.real_allreduce = "gloo"` every exchange of a lockstep arm (ddp, diloco) is `dist.all_reduce` in a gloo process
group instead: rank 0 hosts the rendezvous store, every peer connects to every other directly (gloo's full mesh), and
the result is the weighted mean, the same on every rank.

gloo's sockets do not go through the shaping relays (gloo connects to the addresses its ranks publish in the store),
so this backend runs unshaped only, and its bytes are counted by the kernel instead: `tcp_info`'s `bytes_sent` (less
retransmissions) and `bytes_received` of each TCP socket gloo opened, before and after the all-reduce. That is the TCP payload (gloo's
framing included), as the relays count for hivemind. Linux only (`TCP_INFO`'s layout is Linux's).
"""

from __future__ import annotations

import os
import socket
import struct
from datetime import timedelta

import numpy as np
import torch

# struct tcp_info (linux/tcp.h): u64 counters at these offsets. tcpi_bytes_sent minus tcpi_bytes_retrans (both
# Linux >= 4.19) is the payload sent once; tcpi_bytes_acked (>= 4.1), used on older kernels, lags by what is not yet
# acknowledged. tcpi_bytes_received never counts a byte twice.
_BYTES_ACKED, _BYTES_RECEIVED, _BYTES_SENT, _BYTES_RETRANS = 120, 128, 200, 208
_TCP_INFO_LEN = 232


def _socket_fds() -> dict[int, str]:
    """This process's open file descriptors that are sockets: fd -> 'socket:[inode]'."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:"):
            found[int(name)] = target
    return found


def tcp_bytes(fd: int) -> tuple[int, int] | None:
    """(bytes sent, bytes received) of a connected TCP socket, from the kernel; None otherwise."""
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        if s.type != socket.SOCK_STREAM or s.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
        if len(info) < _BYTES_RECEIVED + 8:
            return None
        received = struct.unpack_from("Q", info, _BYTES_RECEIVED)[0]
        if len(info) >= _BYTES_RETRANS + 8:
            sent, retransmitted = struct.unpack_from("QQ", info, _BYTES_SENT)
            return sent - retransmitted, received
        return struct.unpack_from("Q", info, _BYTES_ACKED)[0], received
    except OSError:
        return None
    finally:
        s.close()


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class GlooGroup:
    """One rank of a gloo process group, and the sockets it opened (to count their bytes)."""

    def __init__(self, rank: int, world: int, host: str, port: int, timeout_s: float):
        import torch.distributed as dist

        before = _socket_fds()
        dist.init_process_group("gloo", init_method=f"tcp://{host}:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        self.dist, self.world = dist, world
        store_port = port
        self.fds: list[int] = []
        for fd, target in _socket_fds().items():
            if before.get(fd) == target:
                continue
            try:
                s = socket.socket(fileno=os.dup(fd))
            except OSError:
                continue
            try:
                ports = {s.getsockname()[1]} | ({s.getpeername()[1]} if _connected(s) else set())
            except OSError:
                continue
            finally:
                s.close()
            if store_port not in ports and tcp_bytes(fd) is not None:
                self.fds.append(fd)  # a gloo pair's connection, not the rendezvous store's

    def counters(self) -> tuple[int, int]:
        sent = received = 0
        for fd in self.fds:
            counts = tcp_bytes(fd)
            if counts is not None:
                sent, received = sent + counts[0], received + counts[1]
        return sent, received

    def weighted_mean(self, tensor: np.ndarray, weight: float) -> tuple[np.ndarray, int, int]:
        """The mean of every rank's `tensor` weighted by `weight`, and this rank's bytes sent and received for it."""
        sent0, received0 = self.counters()
        payload = torch.from_numpy(np.append(np.asarray(tensor, dtype=np.float32) * weight, np.float32(weight)))
        self.dist.all_reduce(payload)  # one all-reduce: the weighted sum and the total weight together
        sent1, received1 = self.counters()
        total = float(payload[-1])
        return (payload[:-1] / total).numpy(), sent1 - sent0, received1 - received0

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


def _connected(s: socket.socket) -> bool:
    try:
        s.getpeername()
        return True
    except OSError:
        return False
