"""A distop client: two ``pow`` jobs in flight at once, collected later.

``call()`` returns at once, so the caller starts both jobs, does other work,
and only then blocks in ``get_result()``. Needs servers (distop/callee.py);
they may start after this script, since chunks wait in a durable queue.

    python distop/caller.py [RABBIT_HOST]
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from distop.errors import DistOpError
from distop.ops import DistOp

TIMEOUT = 60.0


class PowOp(DistOp):
    """Raise every item to a power, on the servers."""

    OP_NAME = "pow"

    def gather(self, partials: dict[int, list[Any]]) -> list[Any]:
        return [x for part in partials.values() for x in part]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rabbit_host", nargs="?", help="host name or amqp(s):// URL (default: AMQP_URL)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("pika").setLevel(logging.CRITICAL)

    try:
        with PowOp(data=list(range(10)), group_size=3, rabbit_host=args.rabbit_host) as op:
            squares = op.call(esp=2)
            cubes = op.call(esp=3)
            print(f"started jobs {squares[:8]} and {cubes[:8]}; doing other work meanwhile")
            print(f"other work: sum(range(10**6)) = {sum(range(10**6))}")
            print("squares:", op.get_result(squares, timeout=TIMEOUT))
            print("cubes:  ", op.get_result(cubes, timeout=TIMEOUT))
    except (DistOpError, TimeoutError) as exc:
        print(f"caller: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
