"""When to ack: pc/consumer.py acks a batch of handled messages at once, ``basic_ack(multiple=True)``.

An ack per message costs a network write and broker work per message, most of
the time a fast handler takes: measured (docs/performance.md), pc/consumer.py
ran at 0.34 of the speed of the fastest plain pika consumer with an ack per
message, and at 0.91 with these batches. One ``basic_ack(multiple=True)`` of
delivery tag T acknowledges every unacknowledged delivery up to T on the
channel. Deliveries are handled one at a time, in order, so each of those has
been handled already: the ack still comes only after handling.

The price: a consumer that crashes has handled, but not acked, fewer than
ACK_EVERY messages, which are delivered again.
"""

from __future__ import annotations

import time

from pika.adapters.blocking_connection import BlockingChannel

# A batch is acked when it holds ACK_EVERY messages (well below the consumer's
# prefetch of 200, so the broker keeps sending), and once ACK_DELAY seconds
# have passed since the last ack: at once after a slow message, and soon after
# the last one when the queue runs dry.
ACK_EVERY = 50
ACK_DELAY = 0.1


class BatchedAcks:
    """Say when a batch of handled messages is due for its ack: ``due(tag)``; ``flush()`` acks the rest."""

    def __init__(self, channel: BlockingChannel) -> None:
        self.channel = channel
        self._last_tag = 0
        self._waiting = 0  # handled, not yet acknowledged
        self._acked_at = time.monotonic()

    def due(self, delivery_tag: int) -> bool:
        """A message has been handled: True if its batch is due (the caller acks up to ``delivery_tag``)."""
        self._last_tag = delivery_tag
        self._waiting += 1
        if self._waiting >= ACK_EVERY or time.monotonic() - self._acked_at >= ACK_DELAY:
            self._acked()
            return True
        if self._waiting == 1:
            # In case no other message comes to fill the batch. A BlockingConnection runs this timer from
            # inside its own calls (start_consuming, process_data_events), on this thread, never in between.
            self.channel.connection.call_later(ACK_DELAY, self.flush)
        return False

    def flush(self) -> None:
        """Acknowledge every handled message not acknowledged yet."""
        if self._waiting and self.channel.is_open:
            self.channel.basic_ack(delivery_tag=self._last_tag, multiple=True)
            self._acked()

    def _acked(self) -> None:
        self._waiting = 0
        self._acked_at = time.monotonic()
