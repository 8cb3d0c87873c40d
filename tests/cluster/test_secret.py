"""A run secret: an outsider without it is refused by the swarm's DHT and by its averagers, with no effect on them."""

import contextlib

import numpy as np
import pytest
import torch

from cluster.real.secret import SECRET_ENV, SECRET_FILE_ENV, SecretAuthorizer, run_secret, secret_schema_hash

SECRET = b"0123456789abcdef-run"
LOCAL = ["/ip4/127.0.0.1/tcp/0"]


def test_the_secret_comes_from_the_environment_or_a_file(monkeypatch, tmp_path):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    monkeypatch.delenv(SECRET_FILE_ENV, raising=False)
    assert run_secret() is None
    monkeypatch.setenv(SECRET_ENV, "short")
    with pytest.raises(ValueError, match=f"{SECRET_ENV}: the run secret must have at least 16 characters"):
        run_secret()
    monkeypatch.delenv(SECRET_ENV)
    (tmp_path / "secret").write_text("a-long-enough-secret\n")
    monkeypatch.setenv(SECRET_FILE_ENV, str(tmp_path / "secret"))
    assert run_secret() == b"a-long-enough-secret"
    assert secret_schema_hash(b"schema", None) == b"schema"
    assert secret_schema_hash(b"schema", b"one-secret-here!") != secret_schema_hash(b"schema", b"another-secret!!")


@contextlib.contextmanager
def started(make):
    made = []
    try:
        yield lambda *a, **k: made.append(make(*a, **k)) or made[-1]
    finally:
        for thing in reversed(made):
            thing.shutdown()


@pytest.mark.hivemind
def test_an_outsider_cannot_use_the_swarms_dht():
    import hivemind
    from hivemind.utils.timed_storage import get_dht_time

    with started(hivemind.DHT) as dht:
        first = dht(start=True, host_maddrs=LOCAL, authorizer=SecretAuthorizer(SECRET))
        peers = [str(a) for a in first.get_visible_maddrs()]
        second = dht(initial_peers=peers, start=True, host_maddrs=LOCAL, authorizer=SecretAuthorizer(SECRET))
        expiration = get_dht_time() + 60
        assert first.store("progress", b"honest", expiration)
        # Without the secret (none, or a guessed one), the swarm answers none of its pings: it cannot join.
        for authorizer in (None, SecretAuthorizer(b"a-guessed-secret-0000")):
            refused = dht(initial_peers=peers, start=False, host_maddrs=LOCAL, authorizer=authorizer)
            with pytest.raises(RuntimeError, match="bootstrap failed: none of the initial_peers responded"):
                refused.run_in_background(await_ready=True, timeout=60)
        # Started regardless, it stays alone: it sees none of the swarm's records and the swarm none of its own.
        outsider = dht(initial_peers=peers, start=False, host_maddrs=LOCAL, ensure_bootstrap_success=False,
                       authorizer=SecretAuthorizer(b"a-guessed-secret-0000"))
        outsider.run_in_background(await_ready=True, timeout=60)
        outsider.store("progress", b"poison", expiration + 1)
        outsider.store("rogue", b"poison", expiration)
        found = outsider.get("progress", latest=True)
        assert found is None or found.value == b"poison"
        assert second.get("progress", latest=True).value == b"honest"
        assert second.get("rogue", latest=True) is None and first.get("rogue", latest=True) is None
        assert second.store("after", b"still-works", expiration)
        assert first.get("after", latest=True).value == b"still-works"


@pytest.mark.hivemind
def test_an_outsider_without_the_secret_is_refused_from_the_average():
    import hivemind
    from hivemind.averaging import DecentralizedAverager

    with started(hivemind.DHT) as dht, started(DecentralizedAverager) as averager:
        first = dht(start=True, host_maddrs=LOCAL)
        peers = [str(a) for a in first.get_visible_maddrs()]
        tensors = [torch.full((64,), float(v)) for v in (1.0, 3.0, 1000.0)]
        made = []
        for i, t in enumerate(tensors):
            node = first if i == 0 else dht(initial_peers=peers, start=True, host_maddrs=LOCAL)
            a = averager([t], node, prefix="run", target_group_size=3, min_group_size=2, min_matchmaking_time=5.0,
                         request_timeout=3.0, start=False)
            # The two insiders bind their schema to the secret; the outsider (the third) cannot.
            a.schema_hash = secret_schema_hash(a.schema_hash, SECRET if i < 2 else None)
            a.run_in_background(await_ready=True, timeout=60)
            made.append(a)
        # The outsider looks for a group for 15 s (every leader refuses it meanwhile); the insiders may take longer.
        controls = [a.step(wait=False, timeout=60 if i < 2 else 15) for i, a in enumerate(made)]
        groups = [c.result() for c in controls[:2]]
        assert all(g is not None and len(g) == 2 for g in groups)  # the insiders averaged, between themselves
        assert set(groups[0]) == set(groups[1]) and made[2].peer_id not in groups[0]
        from hivemind.averaging.partition import AllreduceException

        with pytest.raises(AllreduceException, match="could not find a group"):
            controls[2].result()  # every leader refused it
        for a in made[:2]:
            with a.get_tensors() as (averaged,):
                assert np.allclose(averaged.numpy(), 2.0)  # (1 + 3) / 2: the outsider's 1000 never got in
        with made[2].get_tensors() as (alone,):
            assert np.allclose(alone.numpy(), 1000.0)
