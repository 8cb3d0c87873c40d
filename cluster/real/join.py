"""`farflung join`: placeholder, being written."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--initial-peers", action="append", default=[], metavar="MULTIADDR")


def main(args) -> int:
    raise NotImplementedError("farflung join is being written")
