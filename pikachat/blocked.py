"""A broker that blocks publishers: send.py's plumbing for memory and disk alarms.

A broker short of memory or disk stops reading from the connections that
publish and tells them so with "Connection.Blocked"; a publish then waits
until the alarm clears. pika can give up on such a wait after the URL's
``blocked_connection_timeout`` (ConnectionBlockedTimeout): the sender
(pikachat/sender_plumbing.py) sets it to BLOCKED_TIMEOUT where the URL sets
none, and says "blocked" at once.
"""

from __future__ import annotations

from collections.abc import Callable

import pika
import pika.frame

from pikachat.broker import addresses

# How long a publish may stay blocked by the broker (memory or disk alarm)
# before the sender gives up, unless the URL sets blocked_connection_timeout.
BLOCKED_TIMEOUT = 60


def with_blocked_timeout(url: str) -> str:
    """Return ``url`` with pika's blocked_connection_timeout at BLOCKED_TIMEOUT where an address sets none."""

    def one(address: str) -> str:
        if "blocked_connection_timeout=" in address:
            return address
        return f"{address}{'&' if '?' in address else '?'}blocked_connection_timeout={BLOCKED_TIMEOUT}"

    return ",".join(one(address) for address in addresses(url))


def watch_blocked(
    connection: pika.BlockingConnection,
    on_blocked: Callable[[str], None],
    on_unblocked: Callable[[], None],
) -> float:
    """Call ``on_blocked(reason)`` as soon as the broker blocks ``connection``, ``on_unblocked()`` when it
    lets go; return the connection's blocked_connection_timeout in seconds (0 if none).
    """
    # The connection inside the BlockingConnection, since the BlockingConnection's own
    # callbacks run only once the publish that is blocked has returned: too late to say so.
    impl = connection._impl

    def blocked(_connection: object, frame: pika.frame.Method) -> None:
        on_blocked(frame.method.reason or "no reason given")

    impl.add_on_connection_blocked_callback(blocked)
    impl.add_on_connection_unblocked_callback(lambda _connection, _frame: on_unblocked())
    return float(impl.params.blocked_connection_timeout or 0)
