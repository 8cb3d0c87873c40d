"""Replicas copy one initialisation per process: exactly what each would draw itself, generator included."""

import dataclasses

import torch

from tests.simtools import TINY, TINY_DATA, TINY_OPTIM
from trainer.model import GPT
from trainer.replica import Replica, ReplicaSpec
from trainer.strategies.ddp import DDPSettings

SEED = 5
DROPOUT = dataclasses.replace(TINY, dropout=0.1)


def spec(worker: int) -> ReplicaSpec:
    return ReplicaSpec(worker, 3, SEED, DROPOUT, TINY_DATA, TINY_OPTIM, 2, 4, "ddp", DDPSettings())


def test_every_replica_starts_from_the_model_its_seed_draws():
    torch.manual_seed(SEED)
    drawn = GPT(DROPOUT)
    after = torch.get_rng_state()
    replicas = [Replica(spec(w)) for w in range(3)]
    for r in replicas:
        assert torch.equal(r.flat_params(), torch.nn.utils.parameters_to_vector(drawn.parameters()).detach())
        assert torch.equal(r._rng_state, after)  # dropout's stream starts where the initialisation left it
        assert r.model.lm_head.weight is r.model.transformer.wte.weight  # the tie survives the copy
    # Training one replica leaves the others' (and the next replica's) starting point alone.
    replicas[0].forward_backward()
    replicas[0].optimizer_step(0)
    assert not torch.equal(replicas[0].flat_params(), replicas[1].flat_params())
    assert torch.equal(Replica(spec(0)).flat_params(), replicas[1].flat_params())
