"""The queue ``pc``: both pc/producer.py and pc/consumer.py declare it, with these arguments.

A queue is declared by whoever needs it first; declaring it again with the
same arguments does nothing, and with other arguments is refused. So the two
scripts share one definition.
"""

from __future__ import annotations

import re

QUEUE = "pc"
# A message that comes back unacknowledged more than DELIVERY_LIMIT times is
# dropped (or dead-lettered, if a policy gives the queue a dead-letter
# exchange): it is delivered at most DELIVERY_LIMIT + 1 times. A consumer dies
# holding at most PREFETCH (200) messages, so ordinary crashes rarely return
# one message 6 times; a message that kills every consumer that takes it does,
# and then stops circling.
DELIVERY_LIMIT = 5
QUEUE_ARGUMENTS = {
    # Replicated across the nodes of a cluster, and able to count deliveries.
    "x-queue-type": "quorum",
    "x-delivery-limit": DELIVERY_LIMIT,
}


def inequivalent(reply_text: str) -> str:
    """What to say when the broker refuses our declaration (406): the queue exists with other arguments."""
    vhost = match.group(1) if (match := re.search(r"in vhost '([^']*)'", reply_text)) else "/"
    where = "" if vhost == "/" else f" -p {vhost}"
    return (
        f"queue {QUEUE!r} exists with other arguments, perhaps as a classic queue from an older pc: "
        f"delete it with 'rabbitmqctl delete_queue{where} {QUEUE}' (its messages go with it) "
        f"or change QUEUE in pc/workqueue.py ({reply_text})"
    )
