"""Data-parallel learners over torch.distributed: the rendezvous, and a `Learner` whose gradients are
averaged over the process group before every optimizer step.

Each learner process trains on its own share of the batch with the ordinary `Learner` (accelerate
for mixed precision and gradient accumulation, in its single-process mode). Where `Learner` would
clip and step, `DistributedLearner` first all-reduces the trainable gradients and divides them by
the world size: an explicit all-reduce of the (LoRA) gradients, in flat buckets, rather than
wrapping the UNet in `DistributedDataParallel`, so that the rollout workers, the reference pass
(LoRA adapters off) and the accumulation logic stay those of the single-process learner. All ranks
then hold the same averaged gradients, make the same clip / skip decision and the same optimizer
step, so their weights stay equal; rank 0's are the ones published.

The rendezvous is a `torch.distributed.TCPStore` on rank 0 that listens on one address only (a
socket bound here and handed to the store), 127.0.0.1 unless configured; gloo and NCCL are pointed
at the interface that holds that address.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from trainer.engine.learner import Learner

BUCKET_ELEMENTS = 1 << 24  # gradients are all-reduced in flat fp32 buckets of at most 16M values


def interface_of(address: str) -> str | None:
    """Name of the network interface that holds `address` ("lo" for 127.0.0.1), or None."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == address for a in addrs):
            return name
    return None


def open_rendezvous(host: str) -> socket.socket:
    """A listening TCP socket on `host`, a free port: rank 0's store will serve on it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(128)
    return sock


def join_process_group(
    rank: int,
    world_size: int,
    host: str,
    port: int,
    backend: str,
    timeout_s: float,
    listener: socket.socket | None = None,
) -> None:
    """Join the learners' process group; rank 0 passes the socket from `open_rendezvous`.

    Blocks until all `world_size` ranks have joined, or raises after `timeout_s`. Collectives time
    out after `timeout_s` too, so a peer that dies cannot hang the others for ever.
    """
    ifname = interface_of(host)
    if ifname:  # gloo's and NCCL's own connections on the rendezvous address's interface
        os.environ.setdefault("GLOO_SOCKET_IFNAME", ifname)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", ifname)
    timeout = datetime.timedelta(seconds=timeout_s)
    if rank == 0:
        if listener is None:
            raise ValueError("rank 0 needs the rendezvous socket")
        store = dist.TCPStore(
            host,
            port,
            world_size,
            True,
            timeout=timeout,
            wait_for_workers=False,
            master_listen_fd=listener.detach(),  # the store serves on our loopback-bound socket
        )
    else:
        store = dist.TCPStore(host, port, world_size, False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA tensors, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def _buckets(params: list[torch.nn.Parameter]) -> list[list[torch.nn.Parameter]]:
    out: list[list[torch.nn.Parameter]] = [[]]
    size = 0
    for p in params:
        if out[-1] and size + p.numel() > BUCKET_ELEMENTS:
            out.append([])
            size = 0
        out[-1].append(p)
        size += p.numel()
    return out


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replace every `p.grad` by its mean over the process group (a missing grad counts as zeros).

    Each bucket is flattened to one fp32 tensor, summed with one all-reduce (gloo has no AVG) and
    divided by the world size.
    """
    world = dist.get_world_size()
    for bucket in _buckets(params):
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
        flat = torch.cat([g.detach().reshape(-1).float() for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        offset = 0
        for p in bucket:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
            offset += n


class DistributedLearner(Learner):
    """`Learner` for one rank of a process group: gradients averaged over the ranks before each step.

    Every rank must run the same number of micro-batches per epoch (equal shares), so that they
    reach each all-reduce together.
    """

    def _apply_update(self) -> None:
        average_gradients(list(self.params.values()))
        super()._apply_update()

    def broadcast_weights(self, src: int = 0) -> None:
        """Copy rank `src`'s trainable weights to every rank (after a restore, at start)."""
        with torch.no_grad():
            for p in self.params.values():
                dist.broadcast(p.data, src=src)
