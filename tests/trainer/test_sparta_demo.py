"""SPARTA and DeMo against hand-written references, their byte counts, and their loss on the tiny model."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.proto import runtime_pb2
from simtools import SEED, TINY, TINY_DATA, TINY_OPTIM, simulate

from trainer.data import ShardSampler, load_corpus
from trainer.model import GPT
from trainer.replica import Replica, ReplicaSpec
from trainer.strategies.base import Exchange
from trainer.strategies.demo import BlockDCT, DeMoSettings, dct_basis, extract_fast_components
from trainer.strategies.sparta import SPARTASettings, selected_indices

NONE = runtime_pb2.CompressionType.NONE
N_PARAMS = 33_952  # the tiny preset


def serialized_size(n: int, dtype=torch.float32) -> int:
    return serialize_torch_tensor(torch.zeros(n, dtype=dtype), NONE).ByteSize()


def comm(records):
    return [r for r in records if r.kind == "comm"]


def flat(model):
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


def reference_workers(n):
    workers = []
    for _ in range(n):
        torch.manual_seed(SEED)
        model = GPT(TINY)
        o = TINY_OPTIM
        workers.append((model, model.configure_optimizers(o.weight_decay, o.lr, (o.beta1, o.beta2))))
    return workers


def reference_backward(model, x, y):
    model.zero_grad()
    _, loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), TINY_OPTIM.grad_clip)


def samplers(n, batch_size):
    train = load_corpus(TINY_DATA, SEED).train
    return [ShardSampler(train, w, n, batch_size, TINY.block_size, SEED) for w in range(n)]


def test_tiny_model_size():
    assert GPT(TINY).num_params() == N_PARAMS


@pytest.mark.parametrize(
    "settings, field",
    [
        (SPARTASettings(fraction=0.0), "fraction"),
        (SPARTASettings(fraction=1.5), "fraction"),
        (SPARTASettings(every=0), "every"),
        (DeMoSettings(chunk_size=0), "chunk_size"),
        (DeMoSettings(topk=0), "topk"),
        (DeMoSettings(momentum_decay=1.0), "momentum_decay"),
        (DeMoSettings(lr_scale=0.0), "lr_scale"),
    ],
)
def test_settings_name_the_bad_field(settings, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        settings.check()


# --- SPARTA ---------------------------------------------------------------------------------


def test_sparta_with_fraction_one_is_local_adamw_then_a_full_parameter_mean():
    n, b, steps = 3, 2, 8
    result = simulate(n, b, steps, "sparta", SPARTASettings(fraction=1.0))
    workers, shards = reference_workers(n), samplers(n, b)
    for step in range(steps):
        for (model, optimizer), sampler in zip(workers, shards):
            reference_backward(model, *sampler.next_batch())
            for group in optimizer.param_groups:
                group["lr"] = TINY_OPTIM.lr_at(step, steps)
            optimizer.step()
        mean = torch.stack([flat(m) for m, _ in workers]).mean(0)
        for model, _ in workers:
            torch.nn.utils.vector_to_parameters(mean.clone(), model.parameters())
    for params in result.runtime.call("params"):
        np.testing.assert_allclose(params, mean.numpy(), rtol=1e-4, atol=1e-6)
    # Replicas already agree after the last step, so `finish` sends nothing more.
    assert [r.payload for r in comm(result.records)] == ["sparse_parameters"] * steps


def test_sparta_indices_are_shared_by_seed_and_step():
    k = 170
    a = selected_indices(SEED, 3, N_PARAMS, k)
    assert torch.equal(a, selected_indices(SEED, 3, N_PARAMS, k))
    assert a.numel() == k == len(set(a.tolist())) and torch.all(a[1:] > a[:-1])
    assert len(set(a.tolist()) & set(selected_indices(SEED, 4, N_PARAMS, k).tolist())) < k // 10
    assert not torch.equal(a, selected_indices(SEED + 1, 3, N_PARAMS, k))


def test_sparta_averages_exactly_the_drawn_parameters():
    """Two replicas driven by hand through one step: equal on the k drawn indices, apart elsewhere."""
    fraction, n = 0.01, 2
    replicas = [
        Replica(ReplicaSpec(w, n, SEED, TINY, TINY_DATA, TINY_OPTIM, 2, 10, "sparta", SPARTASettings(fraction)))
        for w in range(n)
    ]
    steps = [r.strategy.train_step(0) for r in replicas]
    exchanges = [s.send(None) for s in steps]
    before = [r.flat_params().clone() for r in replicas]
    assert all(e.payload == "sparse_parameters" for e in exchanges)
    mean = (exchanges[0].tensor + exchanges[1].tensor) / 2
    for s in steps:
        with pytest.raises(StopIteration):
            s.send(mean.clone())
    k = round(fraction * N_PARAMS)
    drawn = selected_indices(SEED, 0, N_PARAMS, k)
    after = [r.flat_params() for r in replicas]
    torch.testing.assert_close(after[0][drawn], (before[0][drawn] + before[1][drawn]) / 2)
    assert torch.equal(after[0][drawn], after[1][drawn])
    rest = torch.ones(N_PARAMS, dtype=torch.bool)
    rest[drawn] = False
    for a, b in zip(after, before):
        assert torch.equal(a[rest], b[rest])
    assert (after[0][rest] != after[1][rest]).float().mean() > 0.9


def test_sparta_message_is_k_float32_values_without_indices():
    steps = 5
    result = simulate(2, 2, steps, "sparta", SPARTASettings(fraction=0.005, every=2))
    rounds = comm(result.records)
    # Rounds inside steps 1 and 3 (0-based); `finish` then averages every parameter once.
    assert [(r.payload, r.step) for r in rounds] == [
        ("sparse_parameters", 1), ("sparse_parameters", 3), ("parameters", steps)
    ]
    k = round(0.005 * N_PARAMS)
    assert k == 170
    assert rounds[0].message_bytes == rounds[1].message_bytes == serialized_size(k)
    assert 0 <= rounds[0].message_bytes - 4 * k <= 20  # a header only: no indices travel
    assert rounds[2].message_bytes == serialized_size(N_PARAMS)
    params = result.runtime.call("params")
    assert np.array_equal(params[0], params[1])


# --- DeMo -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 48, 64])
def test_dct_basis_is_orthonormal_dct_ii(n):
    basis = dct_basis(n)
    torch.testing.assert_close(basis @ basis.T, torch.eye(n), atol=1e-5, rtol=0)
    # DCT-II: the k-th cosine sampled at half-integer points is the k-th basis vector.
    i = torch.arange(n, dtype=torch.float64)
    for k in {0, n // 2, n - 1}:
        coefficients = basis @ torch.cos(math.pi * (2 * i + 1) * k / (2 * n)).float()
        expected = torch.zeros(n)
        expected[k] = math.sqrt(n) if k == 0 else math.sqrt(n / 2)
        torch.testing.assert_close(coefficients, expected, atol=1e-4, rtol=0)


def test_block_dct_tiles_like_the_reference_and_inverts():
    shapes = [tuple(p.shape) for p in GPT(TINY).parameters()]
    transform = BlockDCT(shapes, 64)
    tiles = {t.shape: t.tile for t in transform.tensors}
    # Largest divisor of each side not above 64: 256 -> 64, 96 -> 48, 128 -> 64, 32 -> 32.
    assert tiles == {(256, 32): (64, 32), (32, 32): (32, 32), (32,): (32,), (96, 32): (48, 32),
                     (128, 32): (64, 32), (32, 128): (32, 64)}
    x = torch.randn(N_PARAMS, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(transform.decode(transform.encode(x)), x, atol=1e-5, rtol=0)


def test_fast_component_extraction_conserves_the_momentum():
    transform = BlockDCT([(96, 32), (128,), (10, 3)], chunk_size=16)
    momentum = torch.randn(transform.numel, generator=torch.Generator().manual_seed(1))
    topk = 5
    kept, masks = extract_fast_components(transform, momentum, topk)
    sent = transform.decode(kept)
    residual = momentum - sent  # what the strategy keeps as its momentum
    torch.testing.assert_close(sent + residual, momentum, atol=1e-6, rtol=0)
    # Orthonormal tiles: the energy splits exactly between what is sent and what stays.
    assert math.isclose(momentum.square().sum(), sent.square().sum() + residual.square().sum(), rel_tol=1e-5)
    for coefficients, left, kept_c, mask, t in zip(
        transform.encode(momentum), transform.encode(residual), kept, masks, transform.tensors
    ):
        k = min(topk, t.tile_numel)
        assert torch.all(mask.sum(-1) == k)
        torch.testing.assert_close(left * mask, torch.zeros_like(left), atol=1e-5, rtol=0)
        torch.testing.assert_close(left, coefficients * (1 - mask), atol=1e-5, rtol=0)
        torch.testing.assert_close(kept_c, coefficients * mask, atol=0, rtol=0)
        # The kept ones are the largest of their tile.
        smallest_kept = torch.where(mask.bool(), coefficients.abs(), torch.inf).amin(-1)
        largest_left = torch.where(mask.bool(), -torch.inf, coefficients.abs()).amax(-1)
        assert torch.all(smallest_kept >= largest_left)


def test_demo_keeping_everything_is_sign_descent_on_the_mean_gradient():
    """With top-k covering whole tiles nothing stays behind: p <- p(1 - lr wd) - lr sign(mean clipped grad)."""
    n, b, steps = 2, 2, 4
    result = simulate(n, b, steps, "demo", DeMoSettings(topk=64 * 64, lr_scale=0.5))
    models, shards = [m for m, _ in reference_workers(n)], samplers(n, b)
    for step in range(steps):
        grads = []
        for model, sampler in zip(models, shards):
            reference_backward(model, *sampler.next_batch())
            grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        lr = 0.5 * TINY_OPTIM.lr_at(step, steps)
        decay = torch.cat([torch.full((p.numel(),), p.dim() >= 2) for p in models[0].parameters()])
        params = flat(models[0]).clone()
        params[decay] *= 1 - lr * TINY_OPTIM.weight_decay
        params -= lr * torch.sign((grads[0] + grads[1]) / 2)
        for model in models:
            torch.nn.utils.vector_to_parameters(params.clone(), model.parameters())
    for got in result.runtime.call("params"):
        # A mean gradient within float rounding of zero may take the other sign; allow a handful.
        mismatched = np.abs(got - params.numpy()) > 1e-6
        assert mismatched.sum() <= 10, mismatched.sum()


def test_demo_averages_each_coefficient_over_the_workers_that_kept_it():
    """Two replicas driven by hand through one step, checked against the reference's scatter-mean rule."""
    n, settings, steps = 2, DeMoSettings(), 10
    replicas = [
        Replica(ReplicaSpec(w, n, SEED, TINY, TINY_DATA, TINY_OPTIM, 2, steps, "demo", settings)) for w in range(n)
    ]
    start = replicas[0].flat_params().clone()
    models, shards = [m for m, _ in reference_workers(n)], samplers(n, 2)
    transform = BlockDCT([tuple(p.shape) for p in models[0].parameters()], settings.chunk_size)
    kept, masks = [], []
    for model, sampler in zip(models, shards):
        reference_backward(model, *sampler.next_batch())
        k, m = extract_fast_components(transform, torch.cat([p.grad.reshape(-1) for p in model.parameters()]), 32)
        kept.append(torch.cat([c.reshape(-1) for c in k]))
        masks.append(torch.cat([c.reshape(-1) for c in m]))
    # Each coefficient averaged over the workers that sent it; those nobody sent stay zero.
    count = masks[0] + masks[1]
    assert (count == 1).sum() > 100  # the workers disagree on many coefficients
    q_coefficients = torch.where(count > 0, (kept[0] + kept[1]) / count.clamp_min(1), 0.0)
    per_tensor = torch.split(q_coefficients, [t.numel for t in transform.tensors])
    q = transform.decode([c.view(-1, t.tile_numel) for c, t in zip(per_tensor, transform.tensors)])
    lr = TINY_OPTIM.lr_at(0, steps)
    decay = torch.cat([torch.full((p.numel(),), p.dim() >= 2) for p in models[0].parameters()])
    expected = start.clone()
    expected[decay] *= 1 - lr * TINY_OPTIM.weight_decay
    expected -= lr * torch.sign(q)

    generators = [r.strategy.train_step(0) for r in replicas]
    messages = [g.send(None) for g in generators]
    for message, k, m in zip(messages, kept, masks):
        assert message.payload == "fast_components" and message.sparse
        torch.testing.assert_close(message.tensor, torch.cat([k, m]), atol=1e-6, rtol=1e-5)
    mean = (messages[0].tensor + messages[1].tensor) / 2
    for g in generators:
        with pytest.raises(StopIteration):
            g.send(mean.clone())
    for r in replicas:
        mismatched = (r.flat_params() - expected).abs() > 1e-6
        assert mismatched.sum() <= 5, mismatched.sum()


def test_demo_message_bytes_are_indices_and_values_of_the_kept_coefficients():
    if "nbytes" not in {f.name for f in dataclasses.fields(Exchange)}:
        pytest.skip("Exchange has no `nbytes` field yet: DeMo cannot report its sparse encoding's size")
    result = simulate(2, 2, 3, "demo", DeMoSettings())
    rounds = comm(result.records)
    assert [r.payload for r in rounds] == ["fast_components"] * 3
    # Tiles (kept = min(32, tile size) each): wte 4 x 32, wpe 1 x 32, per layer ln 2 x 1 x 32, c_attn 2 x 32,
    # attn c_proj 1 x 32, c_fc 2 x 32, mlp c_proj 2 x 32 (= 288), ln_f 1 x 32.
    kept = 4 * 32 + 32 + 2 * 288 + 32
    assert kept == 768
    # In-tile indices fit int16 (tiles of at most 64 x 64); values are float32.
    expected = serialized_size(kept, torch.int16) + serialized_size(kept, torch.float32)
    assert 0 <= expected - kept * (2 + 4) <= 40
    for r in rounds:
        assert r.collective == "allgather"
        assert r.message_bytes == expected
        assert r.bytes_sent == [expected, expected]


def test_demo_refuses_a_codec_it_would_ignore():
    with pytest.raises(ValueError, match="codec"):
        simulate(2, 2, 1, "demo", DeMoSettings(), codec="fp16")


# --- both -----------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm, settings", [("sparta", SPARTASettings()), ("demo", DeMoSettings())])
def test_loss_falls_on_the_tiny_model(algorithm, settings):
    result = simulate(2, 4, 40, algorithm, settings, network="home-broadband", eval_every=20)
    evals = result.of("eval")
    losses = [r.loss for r in evals]
    assert len(losses) == 3
    assert losses[-1] < losses[0] - 0.5, losses
    if algorithm == "demo":
        # Every worker applies the same averaged update, so replicas never drift apart.
        assert all(r.param_spread == 0.0 for r in evals)
