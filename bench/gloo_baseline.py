"""The usual way of simulating N workers on one machine: N torch processes, one thread each, gloo collectives.

Each process builds the same GPT (same seed), AdamW with the replica's schedule and clipping, and its own data
shard (`ShardSampler` of worker `rank`), then trains `steps` steps of batch b: DDP all-reduces the flattened
gradients every step; DiLoCo all-reduces the pseudo-gradient every H steps and takes an outer Nesterov step. No
evaluation (the simulator's two held-out evaluations of one batch are a small extra it pays). Written here with
torch.distributed only, so the comparison depends on no outside project.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import time

from bench.memory import PeakRss


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, model_name: str, batch_size: int, steps: int, inner_steps: int,
            seed: int, results) -> None:
    import torch
    import torch.distributed as dist

    from trainer.data import DataConfig, ShardSampler, load_corpus
    from trainer.model import GPT, PRESETS
    from trainer.replica import OptimConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg, optim = PRESETS[model_name], OptimConfig()
    corpus = load_corpus(DataConfig(corpus="stdlib"), seed)
    torch.manual_seed(seed)
    model = GPT(cfg)
    params = list(model.parameters())
    optimizer = model.configure_optimizers(optim.weight_decay, optim.lr, (optim.beta1, optim.beta2))
    sampler = ShardSampler(corpus.train, rank, world, batch_size, cfg.block_size, seed)
    if inner_steps:
        outer = torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)
        shared = torch.nn.utils.parameters_to_vector(params).detach().clone()
    model.train()
    dist.barrier()
    ready = time.time()
    t0 = time.perf_counter()
    for step in range(steps):
        x, y = sampler.next_batch()
        optimizer.zero_grad(set_to_none=False)
        _, loss = model(x, y)
        loss.backward()
        if not inner_steps:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat)
            flat /= world
            torch.nn.utils.vector_to_parameters(flat, [p.grad for p in params])
        for group in optimizer.param_groups:
            group["lr"] = optim.lr_at(step, steps)
        torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
        optimizer.step()
        if inner_steps and ((step + 1) % inner_steps == 0 or step == steps - 1):
            with torch.no_grad():
                pseudo_gradient = shared - torch.nn.utils.parameters_to_vector(params)
                dist.all_reduce(pseudo_gradient)
                pseudo_gradient /= world
                torch.nn.utils.vector_to_parameters(shared, params)
                torch.nn.utils.vector_to_parameters(pseudo_gradient, [p.grad for p in params])
            outer.step()
            shared = torch.nn.utils.parameters_to_vector(params).detach().clone()
    dist.barrier()
    results.put({"rank": rank, "ready": ready, "loop_s": time.perf_counter() - t0, "loss": loss.item()})
    dist.destroy_process_group()


def run_gloo(n_workers: int, model: str, batch_size: int, steps: int, inner_steps: int = 0, seed: int = 0) -> dict:
    """Time N gloo processes from spawn to exit: whole_s, startup_s (spawn to all ready), loop_s, peak RSS."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    with PeakRss() as peak:
        t0_wall, t0 = time.time(), time.perf_counter()
        procs = [ctx.Process(target=_worker, args=(r, n_workers, port, model, batch_size, steps, inner_steps, seed,
                                                   results), daemon=True) for r in range(n_workers)]
        for p in procs:
            p.start()
        reports = [results.get(timeout=1800) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        whole_s = time.perf_counter() - t0
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return {
        "whole_s": whole_s, "startup_s": max(r["ready"] for r in reports) - t0_wall,
        "loop_s": max(r["loop_s"] for r in reports), "peak_rss_bytes": peak.bytes,
        "peak_pss_bytes": peak.pss_bytes, "final_loss": sum(r["loss"] for r in reports) / n_workers,
    }
