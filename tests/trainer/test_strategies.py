"""Strategies against reference implementations written out by hand in plain PyTorch."""

import numpy as np
import pytest
from simtools import simulate as run_arm
import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.proto import runtime_pb2

from trainer.compression import transmit
from trainer.data import DataConfig, ShardSampler, load_corpus
from trainer.model import GPT, PRESETS
from trainer.replica import OptimConfig
from trainer.strategies.ddp import DDPSettings
from trainer.strategies.diloco import DiLoCoSettings

MODEL = PRESETS["tiny"]
DATA = DataConfig(corpus="stdlib", max_bytes=200_000)
OPTIM = OptimConfig(lr=3e-3, warmup_steps=3)
SEED = 7  # the conftest's


def simulate(n, batch_size, steps, algorithm, settings, codec="none", network="datacenter", eval_every=None):
    result = run_arm(n, batch_size, steps, algorithm, settings, codec=codec, network=network, eval_every=eval_every)
    return result.runtime, result.records


def reference_model():
    torch.manual_seed(SEED)
    model = GPT(MODEL)
    optimizer = model.configure_optimizers(OPTIM.weight_decay, OPTIM.lr, (OPTIM.beta1, OPTIM.beta2))
    return model, optimizer


def reference_step(model, optimizer, x, y, step, total_steps):
    optimizer.zero_grad()
    _, loss = model(x, y)
    loss.backward()
    for group in optimizer.param_groups:
        group["lr"] = OPTIM.lr_at(step, total_steps)
    torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.grad_clip)
    optimizer.step()
    return loss.item()


def flat(model):
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


def test_ddp_equals_one_replica_on_the_combined_batch():
    n, b, steps = 4, 2, 20
    runtime, records = simulate(n, b, steps, "ddp", DDPSettings())
    train = load_corpus(DATA, SEED).train
    samplers = [ShardSampler(train, w, n, b, MODEL.block_size, SEED) for w in range(n)]
    model, optimizer = reference_model()
    reference_losses = []
    for step in range(steps):
        batches = [s.next_batch() for s in samplers]
        x = torch.cat([x for x, _ in batches])
        y = torch.cat([y for _, y in batches])
        reference_losses.append(reference_step(model, optimizer, x, y, step, steps))
    for params in runtime.call("params"):
        np.testing.assert_allclose(params, flat(model).numpy(), rtol=1e-4, atol=1e-5)
    # The combined batch's loss is the mean of the workers' equal-sized batch losses.
    per_step = {}
    for r in records:
        if r.kind == "step":
            per_step.setdefault(r.step, []).append(r.loss)
    np.testing.assert_allclose([np.mean(per_step[s]) for s in range(steps)], reference_losses, rtol=1e-4)
    assert sum(r.kind == "comm" for r in records) == steps


def test_diloco_with_one_inner_step_and_plain_outer_sgd_is_parameter_averaging():
    n, b, steps = 3, 2, 10
    settings = DiLoCoSettings(inner_steps=1, outer_lr=1.0, outer_momentum=0.0)
    runtime, records = simulate(n, b, steps, "diloco", settings)
    train = load_corpus(DATA, SEED).train
    samplers = [ShardSampler(train, w, n, b, MODEL.block_size, SEED) for w in range(n)]
    workers = [reference_model() for _ in range(n)]
    for step in range(steps):
        for (model, optimizer), sampler in zip(workers, samplers):
            reference_step(model, optimizer, *sampler.next_batch(), step, steps)
        mean = torch.stack([flat(m) for m, _ in workers]).mean(0)
        for model, _ in workers:
            torch.nn.utils.vector_to_parameters(mean.clone(), model.parameters())
    for params in runtime.call("params"):
        np.testing.assert_allclose(params, mean.numpy(), rtol=1e-4, atol=1e-6)
    assert [r.payload for r in records if r.kind == "comm"] == ["pseudo_gradient"] * steps


def test_diloco_with_nesterov_momentum_equals_its_reference_over_several_outer_steps():
    # Outer steps at steps 2 and 5 and at the end (`finish`): the later ones write the new shared copy into the
    # vector the parameters have just left, which must never be one they still live in.
    n, b, steps, h = 2, 2, 7, 3
    settings = DiLoCoSettings(inner_steps=h, outer_lr=0.7, outer_momentum=0.9)
    runtime, _ = simulate(n, b, steps, "diloco", settings)
    train = load_corpus(DATA, SEED).train
    samplers = [ShardSampler(train, w, n, b, MODEL.block_size, SEED) for w in range(n)]
    workers = [reference_model() for _ in range(n)]
    shared = torch.nn.Parameter(flat(workers[0][0]).clone())
    outer = torch.optim.SGD([shared], lr=0.7, momentum=0.9, nesterov=True)
    for step in range(steps):
        for (model, optimizer), sampler in zip(workers, samplers):
            reference_step(model, optimizer, *sampler.next_batch(), step, steps)
        if (step + 1) % h == 0 or step == steps - 1:
            shared.grad = torch.stack([shared.detach() - flat(m) for m, _ in workers]).mean(0)
            outer.step()
            for model, _ in workers:
                torch.nn.utils.vector_to_parameters(shared.detach().clone(), model.parameters())
    assert not torch.allclose(shared.detach(), flat(reference_model()[0]), atol=1e-3)  # it moved
    for params in runtime.call("params"):
        np.testing.assert_allclose(params, shared.detach().numpy(), rtol=1e-4, atol=1e-6)
    for replica in runtime.replicas:
        assert replica.strategy.shared.data_ptr() != replica.params_vector.data_ptr()
        np.testing.assert_array_equal(replica.strategy.shared.numpy(), replica.params())


def test_diloco_exchanges_every_inner_steps_and_once_more_at_the_end():
    _, records = simulate(2, 2, 12, "diloco", DiLoCoSettings(inner_steps=5))
    comm = [r for r in records if r.kind == "comm"]
    # Rounds happen inside steps 4 and 9 (0-based); `finish` syncs the last two steps after step 11.
    assert [r.step for r in comm] == [4, 9, 12]
    n_params = GPT(MODEL).num_params()
    # fp32 payload: 4 bytes a parameter plus the serializer's header; 2 workers each send one copy.
    assert all(r.message_bytes == transmit(torch.zeros(n_params), "none").nbytes for r in comm)
    assert all(r.bytes_sent == [r.message_bytes] * 2 for r in comm)


@pytest.mark.parametrize(
    "codec, compression_type",
    [
        ("none", runtime_pb2.CompressionType.NONE),
        ("fp16", runtime_pb2.CompressionType.FLOAT16),
        ("scaled-fp16", runtime_pb2.CompressionType.MEANSTD_16BIT),
        ("uint8", runtime_pb2.CompressionType.UNIFORM_8BIT),
        ("quantile8", runtime_pb2.CompressionType.QUANTILE_8BIT),
        ("blockwise8", runtime_pb2.CompressionType.BLOCKWISE_8BIT),
    ],
)
def test_counted_bytes_are_hiveminds_serialized_sizes(codec, compression_type):
    tensor = torch.randn(50_000, generator=torch.Generator().manual_seed(0))
    sent = transmit(tensor, codec)
    assert sent.nbytes == len(serialize_torch_tensor(tensor, compression_type).SerializeToString())
    bytes_per_value = {"none": 4, "fp16": 2, "scaled-fp16": 2, "uint8": 1, "quantile8": 1, "blockwise8": 1}[codec]
    # The payload dominates; the rest is a header and, for 8-bit codecs, a 256-entry codebook
    # (blockwise8 adds a float32 scale per 4096-value block).
    assert 0 <= sent.nbytes - bytes_per_value * tensor.numel() <= 1200
    mean_error = (sent.tensor - tensor).abs().mean().item()
    assert mean_error <= {"none": 0.0, "fp16": 1e-3, "scaled-fp16": 1e-3}.get(codec, 0.05)


def test_codec_bytes_reach_the_comm_records():
    _, records = simulate(2, 2, 3, "ddp", DDPSettings(), codec="fp16")
    n_params = GPT(MODEL).num_params()
    expected = len(serialize_torch_tensor(torch.zeros(n_params), runtime_pb2.CompressionType.FLOAT16).SerializeToString())
    assert {r.message_bytes for r in records if r.kind == "comm"} == {expected}


@pytest.mark.parametrize(
    "algorithm, settings",
    [("ddp", DDPSettings()), ("diloco", DiLoCoSettings(inner_steps=5))],
)
def test_loss_falls_on_the_tiny_model(algorithm, settings):
    _, records = simulate(2, 4, 40, algorithm, settings, network="home-broadband", eval_every=20)
    evals = [r.loss for r in records if r.kind == "eval"]
    assert len(evals) == 3
    assert evals[-1] < evals[0] - 0.8, evals
