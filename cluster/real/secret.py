"""A run secret: a peer without it can neither use the swarm's DHT nor take part in its averages.

The secret comes from the environment (`FARFLUNG_RUN_SECRET`, or a file named by `FARFLUNG_RUN_SECRET_FILE`), never
from the experiment file, so it is written to no config.toml or manifest. It is enforced with hivemind's own hooks:

- the DHT: `SecretAuthorizer` is a `hivemind.utils.auth.AuthorizerBase`, the interface `hivemind.DHT(authorizer=...)`
  wraps every DHT RPC with (`AuthRPCWrapper`, both ways). Each request carries an HMAC-SHA256 under the secret of the
  serialized request, a timestamp and a fresh nonce; each response an HMAC of itself and the request's nonce. A peer
  without the secret gets every request refused (so it cannot store, find or be routed through the swarm's records),
  and its answers are ignored by the swarm's peers;
- the averaging layer: hivemind's matchmaking refuses a peer whose `schema_hash` differs from the leader's
  (`BAD_SCHEMA_HASH`). `secret_schema_hash` makes that hash an HMAC of the tensors' schema under the secret, so an
  averager without it is refused from every group even where it reaches the averagers directly. Lockstep peers bind
  their `ExactAverager`'s hash themselves; a swarm arm's `hivemind.Optimizer` builds its gradient and state averagers
  from farflung's classes (`cluster.real.averager.SwarmGradientAverager`, `cluster.real.swarm_state`), which bind
  theirs through `SecretSchema`. Not covered: a state download (`rpc_download_state`, an empty request with nowhere
  to carry a MAC) checks nothing, so whoever can reach a donor and knows its peer id and the run id (a real run
  prints one peer's) can read the model, though not change it.

libp2p's own private networks (a pre-shared key, `pnet`) would shut outsiders out at the transport; hivemind 1.1.12's
p2pd has no option for one (`p2pd -h` lists none, and the binary holds no `pnet` code), hence the two checks above.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from hivemind.utils.auth import AuthorizedRequestBase, AuthorizedResponseBase, AuthorizerBase
from hivemind.utils.timed_storage import TimedStorage, get_dht_time

SECRET_ENV = "FARFLUNG_RUN_SECRET"
SECRET_FILE_ENV = "FARFLUNG_RUN_SECRET_FILE"
MAX_CLOCK_SKEW_S = 60.0  # a request older or newer than this is refused (hivemind's TokenAuthorizerBase allows 1 min)


def run_secret() -> bytes | None:
    """The run secret from the environment, or None when the run has none; ValueError naming the fix if unusable."""
    value = os.environ.get(SECRET_ENV)
    path = os.environ.get(SECRET_FILE_ENV)
    if value is not None and path is not None:
        raise ValueError(f"{SECRET_ENV} and {SECRET_FILE_ENV} are both set; set one of them")
    if path is not None:
        try:
            value = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{SECRET_FILE_ENV}: cannot read the run secret from {path}: {e}") from None
    if value is None:
        return None
    if len(value) < 16:
        raise ValueError(f"{SECRET_ENV if path is None else SECRET_FILE_ENV}: the run secret must have at least 16 "
                         f"characters, got {len(value)}; e.g. python -c 'import secrets; print(secrets.token_hex(16))'")
    return value.encode("utf-8")


def _mac(secret: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"\x00".join(parts), hashlib.sha256).digest()


class SecretAuthorizer(AuthorizerBase):
    """Signs and checks every DHT request and response with an HMAC under the run secret."""

    def __init__(self, secret: bytes):
        self._secret = secret
        self._recent_nonces = TimedStorage()

    async def sign_request(self, request: AuthorizedRequestBase, service_public_key) -> None:
        auth = request.auth
        auth.time = get_dht_time()
        auth.nonce = secrets.token_bytes(16)
        auth.signature = b""
        auth.signature = _mac(self._secret, b"request", request.SerializeToString())

    async def validate_request(self, request: AuthorizedRequestBase) -> bool:
        auth = request.auth
        signature, auth.signature = auth.signature, b""
        try:
            if not hmac.compare_digest(signature, _mac(self._secret, b"request", request.SerializeToString())):
                return False
        finally:
            auth.signature = signature
        now = get_dht_time()
        if abs(auth.time - now) > MAX_CLOCK_SKEW_S:
            return False
        with self._recent_nonces.freeze():
            if auth.nonce in self._recent_nonces:  # a replayed request
                return False
        self._recent_nonces.store(auth.nonce, None, now + 3 * MAX_CLOCK_SKEW_S)
        return True

    async def sign_response(self, response: AuthorizedResponseBase, request: AuthorizedRequestBase) -> None:
        auth = response.auth
        auth.nonce = request.auth.nonce
        auth.signature = b""
        auth.signature = _mac(self._secret, b"response", response.SerializeToString())

    async def validate_response(self, response: AuthorizedResponseBase, request: AuthorizedRequestBase) -> bool:
        auth = response.auth
        if auth.nonce != request.auth.nonce:
            return False
        signature, auth.signature = auth.signature, b""
        try:
            return hmac.compare_digest(signature, _mac(self._secret, b"response", response.SerializeToString()))
        finally:
            auth.signature = signature


def secret_schema_hash(schema_hash: bytes, secret: bytes | None) -> bytes:
    """The schema hash an averager announces in matchmaking: the tensors' own, bound to the run secret if any."""
    return schema_hash if secret is None else _mac(secret, b"schema", schema_hash)


class SecretSchema:
    """A mixin for a hivemind averager class built by someone else's code (hivemind.Optimizer builds its gradient and
    state averagers and starts them at once): takes `run_secret=` and binds the schema hash to it just before the
    averager's process starts, since matchmaking reads the hash in that process."""

    def __init__(self, *args, run_secret: bytes | None = None, **kwargs):
        self._run_secret = run_secret
        super().__init__(*args, **kwargs)

    def run_in_background(self, *args, **kwargs):
        self.schema_hash = secret_schema_hash(self.schema_hash, self._run_secret)
        return super().run_in_background(*args, **kwargs)


__all__ = ["SECRET_ENV", "SECRET_FILE_ENV", "SecretAuthorizer", "SecretSchema", "run_secret", "secret_schema_hash"]
