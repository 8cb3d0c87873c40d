"""The processes a real peer starts and how it lets others in: its process tree (the DHT and its p2pd, the averagers),
and the DHT authorizer of a run with a secret (`cluster.real.secret`)."""

from __future__ import annotations


def process_tree(pid: int) -> list:
    """psutil handles on `pid` and its descendants (the DHT process and its p2pd, say). A handle refuses to signal a
    pid that has since been reused by another process. Empty if the process is gone."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def authorizer(secret: bytes | None):
    """hivemind's DHT authorizer for a run with a secret (`cluster.real.secret`); None for an open swarm."""
    if secret is None:
        return None
    from cluster.real.secret import SecretAuthorizer

    return SecretAuthorizer(secret)
