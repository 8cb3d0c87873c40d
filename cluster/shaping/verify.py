"""`python -m cluster.shaping.verify --rate 20Mbit --latency 50ms --bytes 8MB --backend relay`: does shaping work here?

Prints the measured and expected time of one timed transfer and the mechanism; exits 1 if the measurement is off by
more than `--tolerance`, 2 if the backend cannot shape as asked on this machine. In code, call `cluster.shaping.verify`
(the function): importing this module would replace that attribute of the package with the module.
"""

from __future__ import annotations

import argparse
import re
import sys

from cluster.network import parse_bandwidth, parse_duration
from cluster.shaping import BACKENDS, ShapingUnavailable
from cluster.shaping import verify as verify_link

_SIZE_RE = re.compile(r"^([0-9]*\.?[0-9]+)\s*([kKMG]i?B|B)?$")
_SIZE_UNITS = {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 1024, "kiB": 1024, "MiB": 1 << 20,
               "GiB": 1 << 30}


def parse_size(text: str) -> int:
    """Bytes from '8MB' (decimal), '4MiB' (binary) or a bare number of bytes."""
    match = _SIZE_RE.match(text.strip())
    if not match or match.group(2) not in (None, *_SIZE_UNITS):
        raise argparse.ArgumentTypeError(f"expected a size such as '8MB', '4MiB' or '65536', got {text!r}")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or "B"])
    if size < 1:
        raise argparse.ArgumentTypeError(f"size must be at least 1 byte, got {text!r}")
    return size


def _parsed(parse):
    def wrapped(text: str):
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return wrapped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.shaping.verify", description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=_parsed(parse_bandwidth), required=True, help="e.g. 20Mbit")
    parser.add_argument("--latency", type=_parsed(parse_duration), default=0.0, help="one-way, e.g. 50ms")
    parser.add_argument("--bytes", type=parse_size, default=parse_size("8MB"), help="e.g. 8MB (default)")
    parser.add_argument("--backend", choices=BACKENDS, default="relay")
    parser.add_argument("--tolerance", type=float, default=0.15, help="allowed |measured/expected - 1| (0.15)")
    args = parser.parse_args(argv)
    try:
        result = verify_link(args.backend, args.rate, args.latency, args.bytes)
    except ShapingUnavailable as error:
        print(f"cannot shape with {args.backend}: {error}", file=sys.stderr)
        return 2
    print(f"measured  {result.seconds:.3f} s  ({result.throughput_bps / 1e6:.2f} Mbit/s goodput)")
    print(f"expected  {result.expected_seconds:.3f} s  = {args.bytes} B * 8 / {args.rate / 1e6:g} Mbit/s "
          f"+ 2 x {args.latency * 1e3:g} ms (data one way, ack back)")
    print(f"ratio     {result.ratio:.3f}")
    print(f"mechanism {result.mechanism}")
    return 0 if abs(result.ratio - 1) <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
