"""The queues ``pc`` and ``pc.dead``: every pc script declares them, with these arguments.

A queue is declared by whoever needs it first; declaring it again with the
same arguments does nothing, and with other arguments is refused. So the
scripts share one definition.
"""

from __future__ import annotations

import re

QUEUE = "pc"
# Where a message goes that comes back unacknowledged more than DELIVERY_LIMIT
# times (dead-lettering): it is delivered at most DELIVERY_LIMIT + 1 times, then
# kept here for a person to look at, instead of circling for ever. A consumer
# dies holding at most PREFETCH (200) messages, so ordinary crashes rarely
# return one message 6 times; a message that kills every consumer that takes
# it does.
DEAD_LETTER_QUEUE = "pc.dead"
DELIVERY_LIMIT = 5
QUEUE_ARGUMENTS = {
    # Replicated across the nodes of a cluster, and able to count deliveries.
    "x-queue-type": "quorum",
    "x-delivery-limit": DELIVERY_LIMIT,
    # Over the limit: republished through the default exchange ("") to pc.dead.
    "x-dead-letter-exchange": "",
    "x-dead-letter-routing-key": DEAD_LETTER_QUEUE,
}
DEAD_LETTER_QUEUE_ARGUMENTS = {
    # Replicated too: a classic queue lives on one node of a cluster, and
    # while that node is down every declaration of it fails (404).
    "x-queue-type": "quorum",
    # Bounded: when full, the oldest dead letter makes room for the new one.
    "x-max-length": 10_000,
}


def inequivalent(reply_text: str) -> str:
    """What to say when the broker refuses our declaration (406): the queue exists with other arguments."""
    queue = match.group(1) if (match := re.search(r"for queue '([^']*)'", reply_text)) else QUEUE
    vhost = match.group(1) if (match := re.search(r"in vhost '([^']*)'", reply_text)) else "/"
    where = "" if vhost == "/" else f" -p {vhost}"
    return (
        f"queue {queue!r} exists with other arguments, perhaps from an older pc (a classic queue, or one "
        f"without a dead-letter queue): delete it with 'rabbitmqctl delete_queue{where} {queue}' (its "
        f"messages go with it) or change the names in pc/workqueue.py ({reply_text})"
    )
