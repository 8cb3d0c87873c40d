"""One worker's replica: its model, inner optimizer, data shard and strategy.

The same class runs in-process (tests, small runs) and inside a Ray actor (the simulator). The
cluster drives it with `advance`, which trains until the strategy asks for an exchange or a step
limit is reached, and reports the FLOPs it spent so the virtual clock can charge compute time.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from trainer import replica_state
from trainer.compression import topk_fraction, transmit, transmit_topk
from trainer.data import Corpus, DataConfig, ShardSampler, heldout_batches, load_corpus
from trainer.model import GPT, GPTConfig, training_flops_per_token
from trainer.settings import setting
from trainer.strategies import STRATEGIES
from trainer.strategies.base import Await, EpochAverage, Exchange, Report, Settings


@dataclass(frozen=True)
class OptimConfig:
    """The inner (per-worker) AdamW and its schedule, shared by every arm of an experiment."""

    lr: float = setting(1e-3, "peak learning rate, after the linear warmup", low=0.0, high=1.0, low_open=True)
    min_lr_ratio: float = setting(0.1, "the cosine decay ends at lr x this", low=0.0, high=1.0)
    warmup_steps: int = setting(10, "steps of linear warmup up to lr", low=0)
    weight_decay: float = setting(0.1, "AdamW's decoupled weight decay", low=0.0, high=1.0)
    beta1: float = setting(0.9, "AdamW's first-moment decay", low=0.0, high=0.9999)
    beta2: float = setting(0.95, "AdamW's second-moment decay", low=0.0, high=0.99999)
    grad_clip: float = setting(1.0, "largest global gradient norm; 0 disables clipping", low=0.0, high=1e6)

    def lr_at(self, step: int, total_steps: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, total_steps - self.warmup_steps)
        min_lr = self.lr * self.min_lr_ratio
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * (self.lr - min_lr)


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything a worker needs to build itself; small and picklable so it can travel to an actor."""

    worker: int
    n_workers: int
    seed: int
    model: GPTConfig
    data: DataConfig
    optim: OptimConfig
    batch_size: int
    total_steps: int
    algorithm: str
    settings: Settings
    codec: str = "none"
    eval_batches: int = 8
    torch_threads: int | None = None


@dataclass(frozen=True)
class StepDone:
    step: int
    loss: float
    flops: float  # spent since the previous event


@dataclass(frozen=True)
class ExchangeRequest:
    payload: str
    collective: str
    group: tuple[int, ...] | None
    tensor: np.ndarray  # float32, as the peers decode it after the codec
    nbytes: int  # serialized size of this worker's message
    flops: float  # spent since the previous event
    weight: float = 1.0
    blocking: bool = True
    sparse: bool = False  # a top-k message: travels by all-gather, cannot be reduced on the way
    raw_nbytes: int = 0  # the payload as dense float32: what the codec's compression ratio is measured against


@dataclass(frozen=True)
class ReportRequest:
    samples: int
    flops: float  # spent since the previous event


@dataclass(frozen=True)
class AwaitRequest:
    payload: str
    flops: float  # spent since the previous event


@dataclass
class _Progress:
    step: int = 0
    finished: bool = False
    flops: float = 0.0
    pending: object = None  # the strategy generator waiting for an exchange's result
    pending_step: int = -1


@functools.lru_cache(maxsize=1)
def _initial_model(config: GPTConfig, seed: int) -> tuple[GPT, torch.Tensor]:
    """The model every worker starts from and the generator's state after drawing it. Drawing it costs more than
    copying it (a third of a second for `small`), once per process rather than once per replica."""
    torch.manual_seed(seed)
    model = GPT(config)
    return model, torch.get_rng_state()


class Replica:
    """`corpus`, if given, is `load_corpus(spec.data, spec.seed)` already loaded (replicas sharing a process share it)."""

    def __init__(self, spec: ReplicaSpec, corpus: Corpus | None = None):
        if spec.torch_threads:
            torch.set_num_threads(spec.torch_threads)
        self.spec = spec
        corpus = load_corpus(spec.data, spec.seed) if corpus is None else corpus
        seq_len = spec.model.block_size
        self.sampler = ShardSampler(corpus.train, spec.worker, spec.n_workers, spec.batch_size, seq_len, spec.seed)
        self._heldout = heldout_batches(corpus.heldout, spec.batch_size, seq_len, spec.eval_batches)
        # Every worker starts from the same initialisation, as if worker 0 had broadcast it: a copy of the one model
        # this process initialised, with torch's generator where that initialisation left it.
        template, rng_after_init = _initial_model(spec.model, spec.seed)
        self.model = copy.deepcopy(template)
        torch.set_rng_state(rng_after_init)
        self._eval_model: GPT | None = None  # holds parameters handed in for evaluation, built on first use
        self.params_vector: torch.Tensor | None = None  # the vector the parameters are views of, once set from one
        o = spec.optim
        self.optimizer = self.model.configure_optimizers(o.weight_decay, o.lr, (o.beta1, o.beta2))
        self.flops_per_batch = training_flops_per_token(spec.model, seq_len) * spec.batch_size * seq_len
        self.strategy = STRATEGIES[spec.algorithm](spec.settings, self)
        self._progress = _Progress()
        self._topk = topk_fraction(spec.codec)
        self._residuals: dict[str, torch.Tensor] = {}  # top-k error feedback, per payload
        # This replica's own stream of torch's global generator (dropout draws from it): replicas sharing a process,
        # in any grouping, draw exactly what each would alone.
        self._rng_state = torch.get_rng_state()

    # --- what strategies call -------------------------------------------------------------
    def forward_backward(self) -> float:
        x, y = self.sampler.next_batch()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=False)
        _, loss = self.model(x, y)
        loss.backward()
        self._progress.flops += self.flops_per_batch
        return loss.item()

    def optimizer_step(self, step: int) -> None:
        lr = self.spec.optim.lr_at(step, self.spec.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.spec.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.spec.optim.grad_clip)
        self.optimizer.step()

    def flat_params(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The parameters as one vector, a copy that does not change as the replica trains on: a new tensor, or
        written into `out` (a vector kept for the whole run, overwritten rather than allocated again)."""
        if out is None:
            return parameters_to_vector(self.model.parameters()).detach()
        return torch.cat([p.detach().view(-1) for p in self.model.parameters()], out=out)

    def set_flat_params(self, flat: torch.Tensor) -> None:
        """The parameters take the values of `flat` by becoming views of it (torch's `vector_to_parameters`): the
        vector is theirs from now on (`params_vector`), and the one they lived in before is no longer theirs."""
        with torch.no_grad():
            vector_to_parameters(flat, self.model.parameters())
        self.params_vector = flat

    def flat_grads(self) -> torch.Tensor:
        return torch.cat([p.grad.reshape(-1) for p in self.model.parameters()])

    def set_flat_grads(self, flat: torch.Tensor) -> None:
        offset = 0
        for p in self.model.parameters():
            n = p.numel()
            if p.grad is None:
                p.grad = torch.empty_like(p)
            p.grad.copy_(flat[offset : offset + n].view_as(p))
            offset += n
        assert offset == flat.numel()

    # --- what the cluster calls -----------------------------------------------------------
    def advance(self, until_step: int, reply: np.ndarray | None = None, finish: bool = False) -> list:
        """Train up to `until_step` (then run the strategy's `finish` if asked), stopping at an exchange or await.

        `reply` answers the request this replica last returned: the average for a blocking exchange
        or an await, None for a non-blocking exchange. Returns the events in order; a request, if
        any, is last.
        """
        with self._own_rng():
            return self._advance(until_step, reply, finish)

    @contextlib.contextmanager
    def _own_rng(self):
        outer = torch.get_rng_state()
        torch.set_rng_state(self._rng_state)
        try:
            yield
        finally:
            self._rng_state = torch.get_rng_state()
            torch.set_rng_state(outer)

    def _advance(self, until_step: int, reply, finish: bool) -> list:
        p = self._progress
        events: list = []
        if reply is None or isinstance(reply, (bool, np.bool_)):
            send = None if reply is None else bool(reply)
        elif isinstance(reply, EpochAverage):
            send = EpochAverage(torch.from_numpy(np.array(reply.tensor, dtype=np.float32)), reply.samples_before)
        else:
            send = torch.from_numpy(np.array(reply, dtype=np.float32))
        while True:
            if p.pending is None:
                if p.step < until_step:
                    p.pending, p.pending_step = self.strategy.train_step(p.step), p.step
                elif finish and not p.finished:
                    p.pending, p.pending_step = self.strategy.finish(), -1
                else:
                    return events
            try:
                request = p.pending.send(send)
            except StopIteration as done:
                if p.pending_step >= 0:
                    events.append(StepDone(p.pending_step, float(done.value), self._take_flops()))
                    p.step += 1
                else:
                    p.finished = True
                p.pending, send = None, None
                continue
            if isinstance(request, Await):
                events.append(AwaitRequest(request.payload, self._take_flops()))
            elif isinstance(request, Report):
                events.append(ReportRequest(request.samples, self._take_flops()))
            else:
                assert isinstance(request, Exchange), f"a strategy yielded {request!r}"
                events.append(self._encode(request))
            return events

    def _encode(self, exchange: Exchange) -> ExchangeRequest:
        """Pass the tensor through the arm's codec, as the other peers will decode it."""
        tensor = exchange.tensor.to(torch.float32)
        raw = exchange.dense_nbytes or 4 * tensor.numel()
        if exchange.nbytes is not None:
            return ExchangeRequest(
                exchange.payload, exchange.collective, exchange.group, tensor.numpy(), exchange.nbytes,
                self._take_flops(), exchange.weight, exchange.blocking, sparse=exchange.sparse, raw_nbytes=raw,
            )
        if self._topk is None:
            sent = transmit(tensor, self.spec.codec)
        else:
            # Error feedback: what top-k leaves out now is added to the next message of this payload.
            residual = self._residuals.get(exchange.payload)
            residual = tensor if residual is None else residual + tensor
            sent = transmit_topk(residual, self._topk)
            self._residuals[exchange.payload] = residual - sent.tensor
        return ExchangeRequest(
            exchange.payload, exchange.collective, exchange.group, sent.tensor.numpy(), sent.nbytes,
            self._take_flops(), exchange.weight, exchange.blocking, sparse=self._topk is not None, raw_nbytes=raw,
        )

    def _take_flops(self) -> float:
        flops, self._progress.flops = self._progress.flops, 0.0
        return flops

    def describe(self) -> dict:
        """What a driver needs to plan this worker's time: its settings and the cost of one microbatch."""
        return {
            "settings": self.spec.settings, "flops_per_batch": self.flops_per_batch,
            "batch_size": self.spec.batch_size, "schedule": self.strategy.schedule,
        }

    def params(self) -> np.ndarray:
        return self.flat_params().numpy()

    def export_state(self) -> dict:
        """Parameters, optimizer and strategy state, as a joining peer downloads them (`trainer.replica_state`)."""
        return replica_state.export_state(self)

    def import_state(self, state: dict) -> int:
        """Load another replica's `export_state`; returns its size in bytes."""
        replica_state.import_state(self, state)
        return replica_state.state_nbytes(state)

    def num_params(self) -> int:
        return self.model.num_params()

    @torch.no_grad()
    def evaluate(self, flat_params: np.ndarray | None = None) -> float:
        """Mean held-out loss of these parameters (this replica's own when None); training state is untouched."""
        model = self.model
        if flat_params is not None:
            # Only the worker that evaluates the consensus needs a second model: built when first asked, a copy
            # (its values are overwritten) so that no replica's random stream moves.
            if self._eval_model is None:
                self._eval_model = copy.deepcopy(self.model)
            model = self._eval_model
            vector_to_parameters(torch.from_numpy(np.asarray(flat_params, dtype=np.float32).copy()), model.parameters())
        model.eval()
        losses = [model(x, y)[1].item() for x, y in self._heldout]
        return float(np.mean(losses))

    def state_dict(self) -> dict:
        """Everything this replica carries into its next step: parameters, inner optimizer, data sampler, its
        stream of torch's generator, progress, top-k error feedback and the strategy's own state. Only between
        steps (a checkpoint's boundary), when no strategy generator is part-way through a step. The tensors are
        this replica's own: save them before it trains on."""
        p = self._progress
        assert p.pending is None, "a replica is checkpointed between steps, never inside one"
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(), "rng": self._rng_state.clone(),
            "progress": {"step": p.step, "finished": p.finished, "flops": p.flops},
            "residuals": dict(self._residuals), "strategy": self.strategy.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`'s state, on a replica built from the same spec."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        self._rng_state = state["rng"].clone()
        self._progress = _Progress(**state["progress"])
        self._residuals = {payload: r.clone() for payload, r in state["residuals"].items()}
        self.strategy.load_state_dict(state["strategy"])
