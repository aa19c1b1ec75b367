"""The queues ``pc`` and ``pc.dead``: every pc script declares them, with these arguments.

A queue is declared by whoever needs it first; declaring it again with the
same arguments does nothing, and with other arguments is refused. So the
scripts share one definition.
"""

from __future__ import annotations

import re

QUEUE = "pc"
# The delivery limit. A quorum queue counts, for each message, how many times it has come back unacknowledged:
# a consumer rejected it, or died, disconnected or stopped holding it (a Ctrl-C counts). With a limit of 5, a
# message is delivered at most 6 times: the first time, and once more after each of its first 5 returns. Its
# 6th return sends it to DEAD_LETTER_QUEUE instead (dead-lettering), for a person to look at (RabbitMQ 3.10;
# tests/test_pc.py checks it). Crashes and stops rarely send one message back 6 times (a consumer dies holding
# at most PREFETCH, 200); a message that kills every consumer that takes it does, and then stops circling.
# A message dead-lettered to a queue that does not exist is dropped: so every script declares
# DEAD_LETTER_QUEUE before QUEUE.
DEAD_LETTER_QUEUE = "pc.dead"
DELIVERY_LIMIT = 5  # Our choice: 6 deliveries at most
QUEUE_ARGUMENTS = {
    # Replicated across the nodes of a cluster, and able to count deliveries. A quorum queue must be
    # declared durable (the broker refuses durable=False), so every script declares it so.
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
    # Our choice: bounded; when full, the oldest dead letter makes room for the new one.
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
