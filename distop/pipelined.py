"""An optimisation, not the lesson: PipelinedOpExecutor takes the next chunk ahead while ops are short.

Read distop/op_executor.py first; this class changes none of its guarantees. Subclass it instead of
OpExecutor when ops take about a millisecond or less (bench/_distop_server.py does); distop/callee.py
keeps to the plain OpExecutor, which is the lesson.

Why: with prefetch 1 a server gets its next chunk only once the broker has settled the ack of the
last one. The work queue is a quorum queue, which settles an ack only after writing it to its log on
disk, on a majority of its nodes (the Raft log that makes it survive a lost node): about 0.65 ms a
chunk on an idle node, more on a busy one. For ops shorter than that, most of a server's time goes in
waiting for the next chunk. Taking one chunk ahead while the op in hand runs cuts that wait: 1,000
short chunks on 2 servers took 1.48 s, against 2.12 s one chunk at a time (docs/performance.md).

How, in RabbitMQ terms:

- after SHORT_OPS_TO_PIPELINE ops in a row shorter than SHORT_OP, the server adds a second consumer
  on its channel: the prefetch limit of 1 is per consumer (RabbitMQ applies basic_qos to each
  consumer created after it on the channel), so that is one more chunk in hand;
- that consumer has a lower consumer priority (x-priority -1): the broker gives it a chunk only while
  every server's first consumer already has one, so taking ahead never starves an idle server;
- as soon as an op runs longer than SHORT_OP, the chunk waiting behind it is given back (rejected
  with requeue) and its consumer cancelled (basic_cancel with its consumer tag, the id basic_consume
  returned): a chunk never waits behind a long op while another server could run it. If only the
  second consumer is left, it is swapped for a first one.
"""

from __future__ import annotations

import collections
import functools
import logging
import time
from typing import ClassVar

import pika
from pika.adapters.blocking_connection import BlockingChannel

from distop.broker import Connection
from distop.op_executor import Chunk, OpExecutor

LOGGER = logging.getLogger(__name__)

# A server takes a chunk ahead after this many ops in a row shorter than SHORT_OP,
# about a round trip to the broker; it stops as soon as an op runs longer.
SHORT_OP = 0.005
SHORT_OPS_TO_PIPELINE = 3


class PipelinedOpExecutor(OpExecutor):
    """An OpExecutor that holds up to MAX_PREFETCH chunks while ops are short; subclass it the same way."""

    # Chunks in hand at most: 2 takes one ahead while ops are short; 1 never does.
    MAX_PREFETCH: ClassVar[int] = 2

    def __init__(self, rabbit_host: str | None = None) -> None:
        super().__init__(rabbit_host)
        self._in_hand_from = ""  # the consumer the chunk in hand came through
        self._started = 0.0  # when its op started
        self._long_op_check: object = None  # the timer that looks again at SHORT_OP into it
        self._waiting: collections.deque[Chunk] = collections.deque()  # received, not started
        self._consumers: list[str] = []  # ours on self._channel: 2 while taking a chunk ahead
        self._ahead: str | None = None  # the one of them that takes a chunk ahead
        self._short_ops = 0  # ops in a row shorter than SHORT_OP
        self._swapping = False  # a lone consumer taking chunks ahead is being swapped for a first one

    # Where it takes chunks ahead: OpExecutor's methods, extended; its story runs unchanged ----------

    def _consume(self, connection: pika.BlockingConnection, channel: BlockingChannel) -> str:
        consumer = super()._consume(connection, channel)
        self._consumers, self._ahead = [consumer], None  # OpExecutor's first consumer, prefetch 1
        return consumer

    def _run_off_io_thread(self, connection: pika.BlockingConnection, chunk: Chunk) -> None:
        """Start the chunk's op, or, if one is running, keep the chunk waiting behind it while it is short."""
        if self._in_hand is not None:
            self._waiting.append(chunk)
            if time.monotonic() - self._started > SHORT_OP:
                self._on_long_op(chunk.channel, self._in_hand)
            return
        self._in_hand_from, self._started = chunk.consumer, time.monotonic()
        if len(self._consumers) > 1:  # a chunk may be waiting behind this op, or coming
            check = functools.partial(self._on_long_op, chunk.channel, chunk.tag)
            self._long_op_check = connection.call_later(SHORT_OP, check)
        super()._run_off_io_thread(connection, chunk)

    def _op_done(self, connection: pika.BlockingConnection, chunk: Chunk, body: bytes) -> None:
        self._before_reply(connection, chunk)
        super()._op_done(connection, chunk, body)  # reply, then ack
        self._after_reply(connection, chunk)

    def _before_reply(self, connection: pika.BlockingConnection, chunk: Chunk) -> None:
        """Before OpExecutor replies and acks: count short ops; cancel a lone consumer taking chunks ahead."""
        if self._long_op_check is not None:
            connection.remove_timeout(self._long_op_check)
            self._long_op_check = None
        self._short_ops = self._short_ops + 1 if chunk.op_seconds < SHORT_OP else 0
        current = self._channel
        # Left with only the consumer that takes chunks ahead (a long op made us cancel the
        # other): swap it for a first consumer, cancelling it while it still holds this chunk.
        self._swapping = (
            current is not None
            and current.is_open
            and chunk.channel is current
            and self._consumers == [chunk.consumer] == [self._ahead]
            and not self._stopping.is_set()
        )
        if self._swapping:
            self._cancel_consumer(chunk.channel, chunk.consumer)

    def _after_reply(self, connection: pika.BlockingConnection, chunk: Chunk) -> None:
        """After OpExecutor replied and acked: start the chunk waiting, or take one ahead."""
        current = self._channel
        if current is None or not current.is_open:
            return
        if self._swapping:
            self._add_consumer(connection, current)
        while self._waiting and self._waiting[0].channel is not current:
            self._waiting.popleft()  # back in the queue with its channel
        if self._waiting:
            self._run_off_io_thread(connection, self._waiting.popleft())
        else:
            self._pipeline_if_short(connection, current)

    # Taking a chunk ahead, and giving it back ---------------------------------

    def _add_consumer(
        self, connection: pika.BlockingConnection, channel: BlockingChannel, *, ahead: bool = False
    ) -> None:
        on_chunk = functools.partial(self._on_chunk, connection)
        # A lower priority: the broker gives it a chunk only while every
        # server's first consumer has one.
        arguments = {"x-priority": -1} if ahead else None
        consumer = channel.basic_consume(self.QUEUE, on_chunk, arguments=arguments)
        self._consumers.append(consumer)
        if ahead:
            self._ahead = consumer

    def _pipeline_if_short(self, connection: pika.BlockingConnection, channel: BlockingChannel) -> None:
        if (
            self._consumers
            and self._ahead is None
            and self.MAX_PREFETCH > 1
            and self._short_ops >= SHORT_OPS_TO_PIPELINE
            and not self._stopping.is_set()
            and channel is self._channel
            and channel.is_open
        ):
            LOGGER.debug("ops are short: taking a chunk ahead")
            self._add_consumer(connection, channel, ahead=True)

    def _on_long_op(self, channel: BlockingChannel, tag: int) -> None:
        """The op in hand has run SHORT_OP: take no chunk ahead, and give back any waiting behind it."""
        if self._in_hand != tag or channel is not self._channel or not channel.is_open:
            return
        self._short_ops = 0
        for chunk in list(self._waiting):
            self._cancel_consumer(channel, chunk.consumer)
            # basic_reject with requeue: back in the queue, for any server (basic_nack would do the same, and
            # can take several at once). Only once per chunk: each time back counts towards DELIVERY_LIMIT.
            if not chunk.redelivered:
                LOGGER.debug("gave back a chunk waiting behind a long op")
                self._waiting.remove(chunk)
                channel.basic_reject(chunk.tag, requeue=True)
        if len(self._consumers) > 1 and self._in_hand_from == self._ahead:
            self._cancel_consumer(channel, self._ahead)  # it holds the op in hand

    def _cancel_consumer(self, channel: BlockingChannel, consumer: str) -> None:
        """Cancel one of our consumers, only ever one holding a chunk: nothing is on its way to it."""
        if consumer in self._consumers and channel.is_open:
            self._consumers.remove(consumer)
            if consumer == self._ahead:
                self._ahead = None
            channel.basic_cancel(consumer)

    # OpExecutor's plumbing, with this class's state reset where it must be ---

    def _serve(self, connection: Connection) -> None:
        self._long_op_check = None
        self._waiting.clear()  # a lost connection's chunks are back in the queue
        super()._serve(connection)

    def _wait_for_chunk_in_hand(self, connection: pika.BlockingConnection) -> None:
        # OpExecutor waits here before consuming again: none of our consumers is left, and chunks
        # waiting from a closed channel are back in the queue. Forget them before the op in hand
        # finishes, or _after_reply would take a chunk ahead on a channel that has no first consumer yet.
        self._waiting = collections.deque(chunk for chunk in self._waiting if chunk.channel is self._channel)
        self._consumers, self._ahead = [], None
        super()._wait_for_chunk_in_hand(connection)

    def _tick(self, connection: pika.BlockingConnection) -> None:
        if self._stopping.is_set():
            self._consumers, self._ahead = [], None  # stop_consuming() cancels them all
        super()._tick(connection)
