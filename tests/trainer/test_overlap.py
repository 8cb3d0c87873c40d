"""Strategies that overlap communication with compute: delayed updates, hivemind local updates with
(delayed) state averaging, and Streaming DiLoCo. Their arithmetic against hand-written PyTorch,
their time accounting against a schedule worked out by hand, and their exchange schedules."""

import numpy as np
import pytest
import torch
from simtools import SEED, TINY, TINY_DATA, TINY_OPTIM, simulate

from cluster.collectives import ring_allreduce
from cluster.devices import get_device
from cluster.network import build_network
from trainer.compression import transmit
from trainer.data import ShardSampler, load_corpus
from trainer.model import GPT, training_flops_per_token
from trainer.strategies.delayed import DelayedDDPSettings
from trainer.strategies.diloco import DiLoCoSettings
from trainer.strategies.local_updates import LocalUpdatesSettings
from trainer.strategies.streaming_diloco import StreamingDiLoCoSettings, fragment_bounds

N_PARAMS = GPT(TINY).num_params()


# --- plain PyTorch references -------------------------------------------------------------------
def samplers(n, batch_size):
    train = load_corpus(TINY_DATA, SEED).train
    return [ShardSampler(train, w, n, batch_size, TINY.block_size, SEED) for w in range(n)]


def reference_worker():
    torch.manual_seed(SEED)
    model = GPT(TINY)
    o = TINY_OPTIM
    return model, model.configure_optimizers(o.weight_decay, o.lr, (o.beta1, o.beta2))


def gradients(model, x, y):
    model.zero_grad()
    model(x, y)[1].backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def adamw_step(model, optimizer, flat_gradients, step, total_steps):
    offset = 0
    for p in model.parameters():
        p.grad = flat_gradients[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    for group in optimizer.param_groups:
        group["lr"] = TINY_OPTIM.lr_at(step, total_steps)
    torch.nn.utils.clip_grad_norm_(model.parameters(), TINY_OPTIM.grad_clip)
    optimizer.step()


def flat(model):
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def set_flat(model, vector):
    torch.nn.utils.vector_to_parameters(vector.clone(), model.parameters())


def assert_replicas_equal(result, expected=None):
    params = result.runtime.call("params")
    assert all(np.array_equal(params[0], p) for p in params[1:]), "replicas ended apart"
    if expected is not None:
        np.testing.assert_allclose(params[0], expected.numpy(), rtol=1e-4, atol=1e-6)


# --- delayed updates ----------------------------------------------------------------------------
def test_delayed_updates_apply_each_average_one_step_late():
    n, b, steps = 2, 2, 8
    result = simulate(n, b, steps, "ddp-delayed", DelayedDDPSettings())
    model, optimizer = reference_worker()
    in_flight = None
    for step, batches in zip(range(steps), zip(*[[s.next_batch() for _ in range(steps)] for s in samplers(n, b)])):
        # The mean of equal-sized batches' gradients, taken on parameters one update behind.
        g = torch.stack([gradients(model, x, y) for x, y in batches]).mean(0)
        if in_flight is not None:
            adamw_step(model, optimizer, *in_flight, steps)
        in_flight = (g, step)
    adamw_step(model, optimizer, *in_flight, steps)  # finish
    assert_replicas_equal(result, flat(model))
    comm = result.of("comm")
    assert [(r.step, r.payload, r.staleness, r.blocking) for r in comm] == [
        (s, "gradients", 1, False) for s in range(steps)
    ]


NETWORK = {"bandwidth": "5Gbit", "latency": "10us"}  # no jitter: every all-reduce takes the closed formula


def schedule_equal_speeds(c, d):
    """Speeds (1, 1), c < d: communication-bound, so after the first step every step takes d.

    step 0: compute to c; all-reduce g0 over [c, c+d].
    step 1: compute to 2c; await g0, idle d-c until c+d; apply; g1 over [c+d, c+2d] (link free at c+d).
    step 2: compute to 2c+d; await g1, idle d-c until c+2d; apply; g2 over [c+2d, c+3d].
    finish: await g2, idle d until c+3d.
    """
    return {
        "step_time": [[c, c], [c + d, c + d], [c + 2 * d, c + 2 * d]],
        "compute": [[c, c]] * 3,
        "comm_idle": [[d - c, d - c], [d - c, d - c], [d, d]],
        "comm_time": [c + d, c + 2 * d, c + 3 * d],
        "end": c + 3 * d,
    }


def schedule_half_speed_worker(c, d):
    """Speeds (1, 0.5), so worker 1 computes for 2c a step; c < d < 2c: the slow worker bounds the run.

    step 0: computes end at (c, 2c); g0 starts when the last member arrives, over [2c, 2c+d].
    step 1: computes end at (2c, 4c); await g0: worker 0 idles d until 2c+d, worker 1 arrives after it;
            g1 over [4c, 4c+d] (worker 1 arrives at 4c, after the link is free at 2c+d).
    step 2: computes end at (3c+d, 6c); await g1: worker 0 idles c until 4c+d, worker 1 none;
            g2 over [6c, 6c+d].
    finish: await g2: worker 0 idles 2c (from 4c+d), worker 1 idles d (from 6c).
    """
    return {
        "step_time": [[c, 2 * c], [2 * c + d, 4 * c], [4 * c + d, 6 * c]],
        "compute": [[c, 2 * c]] * 3,
        "comm_idle": [[d, 0.0], [c, 0.0], [2 * c, d]],
        "comm_time": [2 * c + d, 4 * c + d, 6 * c + d],
        "end": 6 * c + d,
    }


@pytest.mark.parametrize(
    "speed_factors, schedule",
    [((1.0, 1.0), schedule_equal_speeds), ((1.0, 0.5), schedule_half_speed_worker)],
    ids=["equal-speeds", "half-speed-worker"],
)
def test_time_accounting_of_a_delayed_update_run_equals_a_hand_worked_schedule(speed_factors, schedule):
    n, b, steps = 2, 2, 3
    c = training_flops_per_token(TINY) * b * TINY.block_size / get_device("laptop-cpu").effective_flops
    message_bytes = transmit(torch.zeros(N_PARAMS), "none").nbytes
    d = ring_allreduce(build_network(NETWORK, n), [0, 1], message_bytes).time_s
    assert c < d < 2 * c, (c, d)  # the regime both schedules are worked out for
    expected = schedule(c, d)

    result = simulate(n, b, steps, "ddp-delayed", DelayedDDPSettings(), network=NETWORK, speed_factors=speed_factors)
    by_step = sorted(result.of("step"), key=lambda r: (r.step, r.worker))
    step_time = [[r.time_s for r in by_step if r.step == s] for s in range(steps)]
    compute = [[r.compute_s for r in by_step if r.step == s] for s in range(steps)]
    assert step_time == [pytest.approx(t, rel=1e-9) for t in expected["step_time"]]
    assert compute == [pytest.approx(t, rel=1e-9) for t in expected["compute"]]
    comm = result.of("comm")
    assert [r.step for r in comm] == [0, 1, 2]
    assert [r.staleness for r in comm] == [1, 1, 1]
    assert [r.comm_s for r in comm] == pytest.approx([d] * 3, rel=1e-9)
    assert [r.idle_s for r in comm] == [pytest.approx(i, rel=1e-9, abs=1e-15) for i in expected["comm_idle"]]
    assert [r.time_s for r in comm] == pytest.approx(expected["comm_time"], rel=1e-9)
    assert result.of("eval")[-1].time_s == pytest.approx(expected["end"], rel=1e-9)


# --- hivemind local updates ---------------------------------------------------------------------
def test_local_updates_averaging_every_step_is_adamw_then_the_parameter_mean():
    n, b, steps = 2, 2, 6
    result = simulate(n, b, steps, "local-updates", LocalUpdatesSettings(average_state_every=1))
    workers = [reference_worker() for _ in range(n)]
    for step, sampler_batches in enumerate(zip(*[[s.next_batch() for _ in range(steps)] for s in samplers(n, b)])):
        for (model, optimizer), (x, y) in zip(workers, sampler_batches):
            adamw_step(model, optimizer, gradients(model, x, y), step, steps)
        mean = torch.stack([flat(m) for m, _ in workers]).mean(0)
        for model, _ in workers:
            set_flat(model, mean)
    assert_replicas_equal(result, mean)
    comm = result.of("comm")
    assert [(r.step, r.payload, r.collective, r.staleness) for r in comm] == [
        (s, "parameters", "butterfly", 0) for s in range(steps)
    ]


def test_delayed_state_averaging_adds_the_average_minus_what_was_sent():
    n, b, steps, every = 2, 2, 6, 2
    settings = LocalUpdatesSettings(average_state_every=every, delay_state_averaging=True)
    result = simulate(n, b, steps, "local-updates", settings)
    workers = [reference_worker() for _ in range(n)]
    sent = None
    for step, sampler_batches in enumerate(zip(*[[s.next_batch() for _ in range(steps)] for s in samplers(n, b)])):
        for (model, optimizer), (x, y) in zip(workers, sampler_batches):
            adamw_step(model, optimizer, gradients(model, x, y), step, steps)
        if sent is not None:  # the round started a step ago arrives after this step's local update
            mean = torch.stack(sent).mean(0)
            for (model, _), mine in zip(workers, sent):
                set_flat(model, flat(model) + (mean - mine))
            sent = None
        if (step + 1) % every == 0:
            sent = [flat(m) for m, _ in workers]
    final = torch.stack(sent).mean(0)  # the last round (after the last step) is taken as it is
    assert_replicas_equal(result, final)
    comm = result.of("comm")
    assert [(r.step, r.staleness, r.blocking) for r in comm] == [(1, 1, False), (3, 1, False), (5, 1, False)]


# --- Streaming DiLoCo ---------------------------------------------------------------------------
def nesterov(lr, momentum):
    """Outer SGD with Nesterov momentum as torch defines it, written out: buf = mu*buf + g; x -= lr*(g + mu*buf)."""
    buffers = {}

    def step(key, x, g):
        buffers[key] = g.clone() if key not in buffers else momentum * buffers[key] + g
        return x - lr * (g + momentum * buffers[key])

    return step


def test_streaming_diloco_merges_each_fragment_as_the_paper_describes():
    n, b, steps = 2, 2, 10
    # alpha != 0.5, so that swapping the local and shared weights would show.
    s = StreamingDiLoCoSettings(inner_steps=4, fragments=2, overlap_steps=1, alpha=0.25, outer_lr=0.7)
    result = simulate(n, b, steps, "streaming-diloco", s)
    workers = [reference_worker() for _ in range(n)]
    bounds = fragment_bounds(N_PARAMS, s.fragments)
    shared = [flat(workers[0][0])[a:z] for a, z in bounds]
    outer = nesterov(s.outer_lr, s.outer_momentum)
    in_flight = {}  # fragment -> (step sent, averaged pseudo-gradient)

    def outer_step(p, average, alpha):
        a, z = bounds[p]
        shared[p] = outer(p, shared[p], average)
        for model, _ in workers:
            v = flat(model)
            v[a:z] = alpha * v[a:z] + (1 - alpha) * shared[p]
            set_flat(model, v)

    def pseudo_gradient_mean(p):
        a, z = bounds[p]
        return torch.stack([shared[p] - flat(m)[a:z] for m, _ in workers]).mean(0)

    for step, sampler_batches in enumerate(zip(*[[sm.next_batch() for _ in range(steps)] for sm in samplers(n, b)])):
        for (model, optimizer), (x, y) in zip(workers, sampler_batches):
            adamw_step(model, optimizer, gradients(model, x, y), step, steps)
        for p, (sent, average) in sorted(in_flight.items()):
            if step - sent == s.overlap_steps:
                outer_step(p, average, s.alpha)
                del in_flight[p]
        for p in range(s.fragments):
            if (step + 1 - p * s.inner_steps // s.fragments) % s.inner_steps == 0:
                in_flight[p] = (step, pseudo_gradient_mean(p))
    # finish: fragment 1, sent after step 9, is still in flight; then every fragment is
    # synchronised once more, blocking, and taken as it is.
    for p, (_, average) in sorted(in_flight.items()):
        outer_step(p, average, s.alpha)
    for p in range(s.fragments):
        outer_step(p, pseudo_gradient_mean(p), 0.0)
    assert_replicas_equal(result, flat(workers[0][0]))


@pytest.mark.parametrize(
    "overlap_steps, expected",
    [
        # Fragment 0 (offset 0) is sent after steps 3 and 7, fragment 1 (offset 2) after steps 1 and 5; each
        # arrives tau steps later (its record is written then), and `finish` awaits fragment 0's last
        # exchange (1 step old) and then synchronises both fragments, blocking, after step 8.
        (1, [(1, 1, 1), (3, 0, 1), (5, 1, 1), (7, 0, 1), (8, 0, 0), (8, 1, 0)]),
        (2, [(1, 1, 2), (3, 0, 2), (5, 1, 2), (7, 0, 1), (8, 0, 0), (8, 1, 0)]),
    ],
)
def test_streaming_diloco_exchanges_each_fragment_at_its_steps(overlap_steps, expected):
    settings = StreamingDiLoCoSettings(inner_steps=4, fragments=2, overlap_steps=overlap_steps)
    result = simulate(2, 2, 8, "streaming-diloco", settings)
    comm = result.of("comm")
    assert [(r.step, r.payload, r.staleness) for r in comm] == [
        (step, f"pseudo_gradient/{p}", staleness) for step, p, staleness in expected
    ]
    assert [r.blocking for r in comm] == [False] * 4 + [True] * 2
    # Each message is one fragment, serialized as fp32: hivemind's header plus 4 bytes a parameter.
    sizes = [z - a for a, z in fragment_bounds(N_PARAMS, 2)]
    assert sizes == [N_PARAMS // 2] * 2
    for r in comm:
        fragment = int(r.payload.split("/")[1])
        assert r.message_bytes == transmit(torch.zeros(sizes[fragment]), "none").nbytes
        assert 0 < r.message_bytes - 4 * sizes[fragment] < 200
    assert_replicas_equal(result)


def test_streaming_diloco_with_one_fragment_and_no_overlap_is_diloco():
    n, b, steps = 2, 2, 10
    streaming = simulate(n, b, steps, "streaming-diloco",
                         StreamingDiLoCoSettings(inner_steps=4, fragments=1, overlap_steps=0))
    diloco = simulate(n, b, steps, "diloco", DiLoCoSettings(inner_steps=4))
    assert [(r.step, r.blocking) for r in streaming.of("comm")] == [(4 - 1, True), (8 - 1, True), (10, True)]
    assert_replicas_equal(streaming, torch.from_numpy(diloco.runtime.call("params")[0]))


def test_fragments_cover_the_vector_in_near_equal_slices():
    assert fragment_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert fragment_bounds(8, 1) == [(0, 8)]


@pytest.mark.parametrize(
    "settings, field",
    [
        (StreamingDiLoCoSettings(inner_steps=4, fragments=5), "fragments"),
        (StreamingDiLoCoSettings(inner_steps=4, overlap_steps=4), "overlap_steps"),
        (StreamingDiLoCoSettings(overlap_steps=-1), "overlap_steps"),
        (StreamingDiLoCoSettings(alpha=1.5), "alpha"),
        (LocalUpdatesSettings(average_state_every=0), "average_state_every"),
        (LocalUpdatesSettings(delay_state_averaging="yes"), "delay_state_averaging"),
    ],
)
def test_bad_settings_name_their_field(settings, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        settings.check()


def test_defaults_pass_their_checks():
    for settings in (StreamingDiLoCoSettings(), LocalUpdatesSettings(), DelayedDDPSettings()):
        settings.check()


# --- training works -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "algorithm, settings",
    [
        ("ddp-delayed", DelayedDDPSettings()),
        ("local-updates", LocalUpdatesSettings(average_state_every=4, delay_state_averaging=True)),
        ("streaming-diloco", StreamingDiLoCoSettings(inner_steps=6, fragments=3, overlap_steps=1)),
    ],
)
def test_loss_falls_on_the_tiny_model(algorithm, settings):
    result = simulate(2, 4, 40, algorithm, settings, network="home-broadband", eval_every=20)
    evals = [r.loss for r in result.of("eval")]
    assert len(evals) == 3
    assert evals[-1] < evals[0] - 0.5, evals
    assert_replicas_equal(result)
