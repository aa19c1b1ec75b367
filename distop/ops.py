"""Scatter/gather RPC over RabbitMQ: ``DistOp`` on the client, ``OpExecutor`` on the servers.

A client splits a list into one chunk per server and publishes each chunk to
the durable work queue. Each server takes one chunk at a time, runs the op on
it and sends the partial result back to the client's private reply queue,
named in the chunk's ``reply_to``; the ``correlation_id`` (job id and the
chunk's start index) tells the client where the partial belongs. When every
partial is in, ``get_result()`` hands them, in order, to ``gather()``.

Client side::

    class FooOp(DistOp):
        OP_NAME = "foo"

        def gather(self, partials):
            return [x for part in partials.values() for x in part]

    op = FooOp(data=list(range(30)), group_size=3)
    job = op.call()                    # returns at once
    print(op.get_result(timeout=60))   # blocks

Server side::

    class FooExecutor(OpExecutor):
        def foo(self, chunk):
            return chunk

    FooExecutor().run()                # until Ctrl-C or SIGTERM

What holds when things go wrong:

- Servers ack a chunk only after its reply is published, so a server that
  dies loses nothing: the broker gives the chunk to another server. The
  client ignores duplicate replies.
- Servers take one chunk at a time (fair dispatch) while ops are long. While
  ops are short, each takes the next chunk while running one, and as soon as
  an op runs longer than SHORT_OP gives back the chunk waiting behind it, once
  (that counts as one of the chunk's returns), so that no chunk waits behind a
  long op while another server could run it.
- The work queue is a quorum queue with a delivery limit: a chunk that kills
  every server that takes it is dead-lettered after more than DELIVERY_LIMIT
  returns, and the dead letter reaches its client, which raises PoisonChunkError.
- Ops run on a worker thread, so a long op does not starve the connection's
  heartbeats; whatever an op raises or returns becomes a reply. An op that runs
  past the broker's consumer_timeout loses its channel: the server says so,
  still replies, and serves on a new channel.
- If the broker goes away, the client and the servers reconnect; the client
  publishes again every chunk whose result has not arrived. A chunk the broker
  refuses (a nack) is published again on a new channel.
- Only JSON crosses the wire; nothing received is unpickled or evaluated, and
  a malformed reply or chunk is logged and dropped (chunks: dead-lettered).
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import logging
import queue
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.adapters.select_connection import IOLoop
from pika.channel import Channel
from pika.frame import Method
from pika.spec import Basic, BasicProperties

from distop import codec
from distop.broker import connect, explain, parameters, redact, resolve
from distop.errors import BrokerError, DistOpError, PoisonChunkError, RemoteError

__all__ = [
    "BrokerError",
    "DistOp",
    "DistOpError",
    "OpExecutor",
    "PoisonChunkError",
    "RemoteError",
    "split",
]

LOGGER = logging.getLogger(__name__)

# Names that clients and servers must agree on.
WORK_QUEUE = "distop.chunks"
DEAD_LETTER_EXCHANGE = "distop.dead"
DEAD_LETTER_QUEUE = "distop.dead"
CLIENT_HEADER = "distop-client"
# Clients' reply queues are named by the broker, so their names start with this.
REPLY_QUEUE_PREFIX = "amq.gen-"
# A chunk returned to the queue more than this many times (its server died, or
# gave it back) is dead-lettered instead of delivered again: on the 5th return,
# after 5 deliveries. Ordinary crashes and
# restarts stay well below it; a chunk that crashes every server reaches it.
DELIVERY_LIMIT = 4
WORK_QUEUE_ARGUMENTS = {
    "x-queue-type": "quorum",
    "x-delivery-limit": DELIVERY_LIMIT,
    "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
}
# The dead-letter queue keeps rejected and poison chunks for inspection, bounded.
DEAD_LETTER_QUEUE_ARGUMENTS = {"x-max-length": 10_000}
JSON = "application/json"
# Chunks published but not yet confirmed by the broker, at most.
PUBLISH_WINDOW = 1000
# After losing the broker, keep trying this long before giving up.
RECONNECT_FOR = 60.0
MAX_BACKOFF = 5.0
# After a nack, publish again on a new channel after this pause, doubled up to the maximum.
NACK_BACKOFF = 0.1
MAX_NACK_BACKOFF = 2.0
CONNECT_TIMEOUT = 60.0
# A server takes a chunk ahead (a second consumer) after this many ops in a
# row shorter than SHORT_OP, about a round trip to the broker; it stops as soon
# as an op runs longer, and gives back the chunk waiting behind it.
SHORT_OP = 0.005
SHORT_OPS_TO_PIPELINE = 3


def split(data: list[Any], group_size: int) -> list[tuple[int, list[Any]]]:
    """Split ``data`` into ``min(group_size, len(data))`` contiguous chunks.

    Returns ``(start_index, chunk)`` pairs; chunk sizes differ by at most one.
    """
    count = min(group_size, len(data))
    size, extra = divmod(len(data), count)
    chunks, start = [], 0
    for i in range(count):
        end = start + size + (1 if i < extra else 0)
        chunks.append((start, data[start:end]))
        start = end
    return chunks


# --------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------


@dataclass
class _Job:
    """One call(): its encoded chunk requests and what has come back so far."""

    id: str
    requests: dict[int, bytes]  # start index -> request body
    partials: dict[int, Any] = field(default_factory=dict)
    error: DistOpError | None = None
    watched: bool = False  # a get_result() with a progress callback wants every partial

    @property
    def done(self) -> bool:
        return self.error is not None or len(self.partials) == len(self.requests)


class DistOp:
    """The client side of a scatter/gather op; subclass it, set OP_NAME, override gather().

    ``data`` is a non-empty list of JSON-serialisable items, split into
    ``group_size`` chunks (one per server). ``rabbit_host`` is a host name or
    an amqp(s):// URL; without it, ``AMQP_URL``, then localhost. Nothing
    connects until the first ``call()``. Use it as a context manager, or call
    ``close()``, to release the connection.
    """

    OP_NAME: ClassVar[str] = ""
    QUEUE: ClassVar[str] = WORK_QUEUE

    def __init__(self, data: list[Any], group_size: int = 1, rabbit_host: str | None = None) -> None:
        if not self.OP_NAME:
            raise TypeError(f"{type(self).__name__} must set OP_NAME to the name of the server's op")
        data = list(data)
        if not data:
            raise ValueError("data must be a non-empty list")
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise TypeError(f"group_size must be an int, not {type(group_size).__name__}")
        if group_size < 1:
            raise ValueError(f"group_size must be at least 1, not {group_size}")
        _check_json(data, "data")
        self.data = data
        self.group_size = group_size
        self._url = resolve(rabbit_host)
        parameters(self._url)  # a malformed URL fails here, not at the first call
        self._cond = threading.Condition()
        self._jobs: dict[str, _Job] = {}
        self._link: _ClientLink | None = None

    def gather(self, partials: dict[int, Any]) -> Any:
        """Combine the partial results, given as ``{start_index: partial}`` in order.

        The default returns the partials as a list, in order.
        """
        return list(partials.values())

    def call(self, **params: Any) -> str:
        """Publish one chunk per server and return the job id at once.

        ``params`` reach the server's op as keyword arguments. Raises
        BrokerError if the broker cannot be reached, TypeError if ``params``
        are not JSON-serialisable.
        """
        _check_json(params, "params")
        job_id = uuid.uuid4().hex
        requests = {
            start: codec.dumps({"op": self.OP_NAME, "chunk": chunk, "params": params})
            for start, chunk in split(self.data, self.group_size)
        }
        if self._link is None or self._link.failed:
            self._link = None
            link = _ClientLink(self._url, self.QUEUE, self._cond, self._jobs)
            link.start_and_wait(CONNECT_TIMEOUT)  # BrokerError if not; the next call() tries again
            self._link = link
        self._link.submit(_Job(job_id, requests))
        return job_id

    def get_result(
        self,
        job_id: str | None = None,
        timeout: float | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Any:
        """Block until every partial of the job is in; return ``gather(partials)``.

        ``job_id`` may be left out when exactly one job is pending (else
        ValueError). ``progress(done, total)`` is called, in this thread, as
        partials arrive. Raises TimeoutError once ``timeout`` seconds pass (the
        job stays pending: you may wait again), RemoteError if a server's op
        raised, PoisonChunkError if a chunk was dead-lettered, BrokerError if
        the broker was lost for good.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            job = self._pending_job(job_id)
            job.watched = job.watched or progress is not None
            reported = -1
            while not job.done:
                if progress is not None and len(job.partials) != reported:
                    reported = len(job.partials)
                    progress(reported, len(job.requests))
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(
                        f"job {job.id}: {len(job.partials)} of {len(job.requests)} partial results "
                        f"within {timeout} s (is a server serving {self.OP_NAME!r}?)"
                    )
                self._cond.wait(remaining)
            self._jobs.pop(job.id, None)
        if job.error is not None:
            raise job.error
        if progress is not None:
            progress(len(job.partials), len(job.requests))
        return self.gather(dict(sorted(job.partials.items())))

    def pending(self) -> list[str]:
        """The ids of the jobs called but not yet collected."""
        with self._cond:
            return list(self._jobs)

    def cancel(self, job_id: str) -> None:
        """Give up on a job: forget it, and never publish its chunks again.

        Chunks already in the queue still run (a queue cannot take a message
        back); their replies are dropped. A thread waiting for the job in
        ``get_result()`` gets DistOpError. Raises ValueError for an unknown job.
        """
        with self._cond:
            job = self._jobs.pop(job_id, None)
            if job is None:
                raise ValueError(f"no pending job {job_id!r}")
            if not job.done:
                job.error = DistOpError(f"job {job_id} was cancelled")
            self._cond.notify_all()

    def close(self) -> None:
        """Close the connection; jobs still pending fail (``get_result()`` raises DistOpError).

        The object stays usable: the next ``call()`` connects again.
        """
        if self._link is not None:
            self._link.close()
            self._link = None
        with self._cond:
            for job in self._jobs.values():
                if not job.done:
                    job.error = DistOpError(f"job {job.id}: the client was closed before the job completed")
            self._cond.notify_all()

    def __enter__(self) -> DistOp:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _pending_job(self, job_id: str | None) -> _Job:
        if job_id is None:
            if len(self._jobs) != 1:
                raise ValueError(f"{len(self._jobs)} jobs are pending: say which one with job_id")
            return next(iter(self._jobs.values()))
        try:
            return self._jobs[job_id]
        except KeyError:
            raise ValueError(f"no pending job {job_id!r}") from None


def _check_json(value: object, name: str) -> None:
    try:
        codec.dumps(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError(f"{name} must be JSON-serialisable: {exc}") from None


def _guarded(method: Callable[..., None]) -> Callable[..., None]:
    """Wrap an I/O-thread callback: a bug in it fails the pending jobs instead of the connection.

    pika takes an exception escaping a callback for a lost connection (it
    reconnects and every pending chunk is published again) or ends its loop
    (and ``get_result()`` would wait forever).
    """

    @functools.wraps(method)
    def wrapper(self: _ClientLink, *args: Any) -> None:
        try:
            method(self, *args)
        except Exception as exc:
            LOGGER.exception("unexpected error in the client's I/O thread")
            self._give_up(DistOpError(f"the distop client failed: {type(exc).__name__}: {_text(exc)}"))

    return wrapper


class _ClientLink(threading.Thread):
    """The client's connection, owned by this thread; other threads only submit jobs.

    It runs one pika IOLoop for its whole life; connections come and go inside
    it. On every (re)connection it declares the queues on one channel, which
    then consumes the replies, and publishes on a second channel, with
    pipelined publisher confirms, every chunk whose result has not arrived.
    """

    def __init__(self, url: str, queue: str, cond: threading.Condition, jobs: dict[str, _Job]) -> None:
        super().__init__(name="distop-client", daemon=True)
        self._url = url
        self._queue = queue
        self._cond = cond  # guards jobs and _new; notified when a job changes
        self._jobs = jobs
        self._new: list[str] = []  # job ids submitted since the last (re)connection
        self._client_id = uuid.uuid4().hex
        self._ioloop = IOLoop()
        self._connection: pika.SelectConnection | None = None
        self._nodes = parameters(url)  # each connection attempt tries the next
        self._attempts: list[BaseException] = []  # why each node failed, until one answers
        self._channel: Channel | None = None  # declarations, then the reply consumer
        self._publisher: Channel | None = None  # chunks out, once in confirm mode
        self._publisher_opening: Channel | None = None  # the publishing channel, from its opening on
        self._reply_queue = ""  # set only while this connection's reply queue is consumed
        self._outbox: collections.deque[tuple[str, int]] = collections.deque()
        self._unconfirmed: dict[int, tuple[str, int]] = {}
        self._next_tag = 1
        self._republish_all = False
        self._ready = threading.Event()
        self._error: DistOpError | None = None
        self._ever_connected = False
        self._lost_since: float | None = None
        self._backoff = 0.5
        self._nack_backoff = NACK_BACKOFF
        self._closing = False
        self.failed = False

    # Called from the caller's thread ---------------------------------------

    def start_and_wait(self, timeout: float) -> None:
        self.start()
        if not self._ready.wait(timeout):
            self.close()
            self.failed = True
            raise BrokerError(f"cannot connect to {redact(self._url)}: timed out")
        if self._error is not None:
            raise self._error

    def submit(self, job: _Job) -> None:
        with self._cond:
            self._jobs[job.id] = job
            self._new.append(job.id)
        self._ioloop.add_callback_threadsafe(self._publish_new)

    def close(self) -> None:
        self._closing = True
        if self.is_alive():
            self._ioloop.add_callback_threadsafe(self._shutdown)
            if threading.current_thread() is not self:
                self.join(10)

    # The I/O thread ---------------------------------------------------------

    def run(self) -> None:
        try:
            self._connect()
            self._ioloop.start()
        except Exception as exc:
            LOGGER.exception("unexpected error in the client's I/O thread")
            self._error = DistOpError(f"the distop client failed: {type(exc).__name__}: {_text(exc)}")
        finally:
            # Whatever ended the loop, no job waits for a thread that is gone.
            self.failed = True
            self._fail_pending(self._error or DistOpError("the distop client's connection was closed"))
            self._ready.set()
            self._ioloop.close()

    @_guarded
    def _shutdown(self) -> None:
        if self._connection is not None and self._connection.is_open:
            self._connection.close()  # _on_closed stops the loop
        else:
            self._ioloop.stop()

    @_guarded
    def _connect(self) -> None:
        self._nodes.append(self._nodes.pop(0))  # try the next node (the first, the first time)
        self._connection = pika.SelectConnection(
            self._nodes[-1],
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed,
            custom_ioloop=self._ioloop,
        )

    @_guarded
    def _on_open(self, connection: pika.SelectConnection) -> None:
        connection.channel(on_open_callback=self._on_channel_open)

    @_guarded
    def _on_open_error(self, _connection: pika.SelectConnection, error: BaseException) -> None:
        self._attempts.append(error)
        if self._ever_connected or len(self._attempts) < len(self._nodes):
            self._reconnect_later()
        else:
            # Never reached any node: say why at once rather than retry.
            self._give_up(explain(self._url, *self._attempts))

    @_guarded
    def _on_closed(self, _connection: pika.SelectConnection, reason: Exception) -> None:
        # Nothing of this connection may be used again: not its channels, and
        # not its reply queue, which the broker deletes with it.
        self._channel = self._publisher = self._publisher_opening = None
        self._reply_queue = ""
        self._unconfirmed.clear()
        if self._closing or self.failed:
            self._ioloop.stop()
            return
        LOGGER.warning("lost the broker (%s); reconnecting", reason)
        self._reconnect_later()

    def _reconnect_later(self) -> None:
        now = time.monotonic()
        if self._lost_since is None:
            self._lost_since = now
        if now - self._lost_since > RECONNECT_FOR:
            self._give_up(
                BrokerError(f"lost {redact(self._url)} and could not reconnect within {RECONNECT_FOR:.0f} s")
            )
            return
        self._ioloop.call_later(self._backoff, self._connect)
        self._backoff = min(self._backoff * 2, MAX_BACKOFF)

    def _give_up(self, error: DistOpError) -> None:
        """Fail every pending job with ``error`` and end the thread."""
        self.failed = True
        self._error = error
        self._fail_pending(error)
        self._ready.set()
        if self._connection is not None and self._connection.is_open:
            self._connection.close()
        else:
            self._ioloop.stop()

    def _fail_pending(self, error: DistOpError) -> None:
        with self._cond:
            for job in self._jobs.values():
                if not job.done:
                    job.error = error
            self._cond.notify_all()

    @_guarded
    def _on_channel_open(self, channel: Channel) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        # Set-up runs as a chain: each step's callback starts the next one.
        channel.exchange_declare(
            DEAD_LETTER_EXCHANGE, "headers", durable=True, callback=self._declare_work_queue
        )

    @_guarded
    def _declare_work_queue(self, _frame: Method) -> None:
        assert self._channel is not None
        self._channel.queue_declare(
            self._queue, durable=True, arguments=WORK_QUEUE_ARGUMENTS, callback=self._declare_reply_queue
        )

    @_guarded
    def _declare_reply_queue(self, _frame: Method) -> None:
        assert self._channel is not None
        # Exclusive and server-named: it lives and dies with this connection.
        self._channel.queue_declare("", exclusive=True, callback=self._bind_reply_queue)

    @_guarded
    def _bind_reply_queue(self, frame: Method) -> None:
        assert self._channel is not None
        queue_name = frame.method.queue
        # Chunks carry our client id; when one is dead-lettered, this binding
        # brings the dead letter back to us.
        self._channel.queue_bind(
            queue_name,
            DEAD_LETTER_EXCHANGE,
            arguments={"x-match": "all", CLIENT_HEADER: self._client_id},
            callback=lambda _frame: self._consume_replies(queue_name),
        )

    @_guarded
    def _consume_replies(self, queue_name: str) -> None:
        assert self._channel is not None
        # auto_ack: a reply's only destination is this process's memory.
        self._channel.basic_consume(queue_name, self._on_reply, auto_ack=True)
        self._reply_queue = queue_name
        self._republish_all = True  # a new connection: everything in flight goes out again
        self._open_publisher()

    @_guarded
    def _on_channel_closed(self, _channel: Channel, reason: Exception) -> None:
        if self._closing or self.failed or not isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            return
        if not self._reply_queue:
            # A declaration refused, e.g. the work queue exists with other
            # arguments: retrying won't help.
            self._give_up(BrokerError(f"the broker refused our queues: {reason}"))
        elif self._connection is not None and self._connection.is_open:
            # Our replies were consumed on it: start over on a new connection.
            LOGGER.warning("the broker closed the reply channel (%s); reconnecting", reason)
            self._connection.close()

    def _open_publisher(self) -> None:
        if self._connection is not None and self._connection.is_open and self._reply_queue:
            self._connection.channel(on_open_callback=self._on_publisher_open)

    @_guarded
    def _on_publisher_open(self, channel: Channel) -> None:
        self._publisher_opening = channel
        channel.add_on_close_callback(self._on_publisher_closed)
        channel.confirm_delivery(self._on_confirm, callback=lambda _frame: self._on_publisher_ready(channel))

    @_guarded
    def _on_publisher_ready(self, channel: Channel) -> None:
        if channel is not self._publisher_opening:
            return
        self._publisher = channel
        self._next_tag = 1
        self._unconfirmed.clear()
        if self._republish_all:
            self._republish_all = False
            self._ever_connected = True
            self._lost_since, self._backoff = None, 0.5
            # Whatever was in flight on a lost connection goes out again:
            # replies to the old reply queue are gone, duplicates are ignored.
            with self._cond:
                self._new.clear()
                self._outbox = collections.deque(
                    (job.id, start)
                    for job in self._jobs.values()
                    if not job.done
                    for start in job.requests
                    if start not in job.partials
                )
            self._ready.set()
        self._publish()

    @_guarded
    def _on_publisher_closed(self, channel: Channel, reason: Exception) -> None:
        if channel is not self._publisher_opening:
            return  # one we closed on purpose
        self._publisher = self._publisher_opening = None
        if self._closing or self.failed or not isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            return
        LOGGER.warning("the broker closed the publishing channel (%s); opening another", reason)
        self._publish_again_later()

    def _publish_again_later(self) -> None:
        """Put every unconfirmed chunk back in the outbox; publish on a new channel after a pause."""
        self._outbox.extendleft(reversed([self._unconfirmed[tag] for tag in sorted(self._unconfirmed)]))
        self._unconfirmed.clear()
        self._ioloop.call_later(self._nack_backoff, self._reopen_publisher)
        self._nack_backoff = min(self._nack_backoff * 2, MAX_NACK_BACKOFF)

    @_guarded
    def _reopen_publisher(self) -> None:
        if self._publisher_opening is None:
            self._open_publisher()

    @_guarded
    def _publish_new(self) -> None:
        with self._cond:
            for job_id in self._new:
                self._outbox.extend((job_id, start) for start in self._jobs[job_id].requests)
            self._new.clear()
        self._publish()

    def _publish(self) -> None:
        channel = self._publisher
        if channel is None or not channel.is_open or not self._reply_queue:
            return
        while self._outbox and len(self._unconfirmed) < PUBLISH_WINDOW:
            job_id, start = self._outbox.popleft()
            with self._cond:
                job = self._jobs.get(job_id)
                if job is None or job.done or start in job.partials:
                    continue  # collected, failed or cancelled meanwhile
                body = job.requests[start]
            properties = BasicProperties(
                content_type=JSON,
                delivery_mode=pika.DeliveryMode.Persistent,
                reply_to=self._reply_queue,
                correlation_id=f"{job_id}:{start}",
                headers={CLIENT_HEADER: self._client_id},
            )
            channel.basic_publish("", self._queue, body, properties)
            self._unconfirmed[self._next_tag] = (job_id, start)
            self._next_tag += 1

    @_guarded
    def _on_confirm(self, frame: Method) -> None:
        if self._publisher is None or frame.channel_number != self._publisher.channel_number:
            return  # from a channel given up after a nack: its chunks are in the outbox again
        method = frame.method
        if method.multiple:
            # Tags go in increasing: stop at the first beyond, not scan all 1,000.
            tags = list(itertools.takewhile(lambda tag: tag <= method.delivery_tag, self._unconfirmed))
        else:
            tags = [method.delivery_tag]
        if isinstance(method, Basic.Nack):
            # Publishing again on the same channel may never succeed: on a
            # cluster, a channel can keep pointing at a queue leader that died,
            # and nack everything. A new channel finds the new leader.
            LOGGER.warning(
                "the broker refused %d chunk(s); publishing again on a new channel in %.1f s",
                len(tags),
                self._nack_backoff,
            )
            channel = self._publisher
            self._publisher = self._publisher_opening = None
            self._publish_again_later()
            if channel is not None and channel.is_open:
                channel.close()
            return
        for tag in tags:
            self._unconfirmed.pop(tag, None)
        self._nack_backoff = NACK_BACKOFF
        self._publish()

    @_guarded
    def _on_reply(
        self, _channel: Channel, method: Basic.Deliver, props: BasicProperties, body: bytes
    ) -> None:
        # Anyone allowed to publish to this queue can send anything: every
        # property and the body are checked before they are believed.
        correlation_id = props.correlation_id if isinstance(props.correlation_id, str) else ""
        match = CORRELATION_ID.fullmatch(correlation_id)
        if match is None:
            LOGGER.warning(
                "dropped a reply whose correlation_id is not JOB:START: %.80r", props.correlation_id
            )
            return
        job_id, start = match[1], int(match[2])
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.done or start not in job.requests or start in job.partials:
                LOGGER.debug("dropped a reply for %s: unknown, late or duplicate", correlation_id)
                return
            headers = props.headers if isinstance(props.headers, dict) else {}
            if method.exchange == DEAD_LETTER_EXCHANGE and "x-death" in headers:
                job.error = _dead_letter_error(job_id, start, headers)
            else:
                try:
                    reply = _decode_reply(body)
                except (ValueError, RecursionError) as exc:  # json: RecursionError on deep nesting
                    LOGGER.warning("dropped a malformed reply for %s: %s", correlation_id, _text(exc)[:200])
                    return
                if isinstance(reply, RemoteError):
                    job.error = reply
                else:
                    job.partials[start] = reply.result
            if job.done or job.watched:  # one wake-up per job, not one per partial
                self._cond.notify_all()


@dataclass
class _Partial:
    result: Any


# A correlation id as clients make them: the job id (uuid4 hex) and a start index.
CORRELATION_ID = re.compile(r"([0-9a-f]{32}):([0-9]{1,18})", re.ASCII)


def _decode_reply(body: bytes) -> _Partial | RemoteError:
    """A server's reply: the partial result, or the error its op raised. ValueError if malformed."""
    reply = codec.loads(body)
    if not isinstance(reply, dict):
        raise ValueError("not a JSON object")
    if "error" in reply:
        error = reply["error"]
        fields = ("type", "message", "host")
        if not isinstance(error, dict) or not all(isinstance(error.get(f), str) for f in fields):
            raise ValueError('"error" is not an object of strings type, message and host')
        return RemoteError(error["type"], error["message"], error["host"])
    if "result" not in reply:
        raise ValueError('neither "result" nor "error"')
    return _Partial(reply["result"])


def _dead_letter_error(job_id: str, start: int, headers: dict[str, Any]) -> PoisonChunkError:
    reason = headers.get("x-first-death-reason", "dead-lettered")
    if isinstance(reason, bytes):
        reason = reason.decode(errors="replace")
    if reason == "delivery_limit":
        return PoisonChunkError(
            f"job {job_id}: the chunk at index {start} was delivered {DELIVERY_LIMIT + 1} times and "
            "never finished; it probably crashes the servers that take it"
        )
    if reason == "rejected":
        return PoisonChunkError(f"job {job_id}: a server rejected the chunk at index {start} as malformed")
    return PoisonChunkError(
        f"job {job_id}: the chunk at index {start} was dead-lettered ({str(reason)[:80]})"
    )


# --------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------


class UnknownOpError(Exception):
    """Raised on the server, and sent back, when a chunk names an op it does not have."""


class OpExecutor:
    """The server side: subclass it with one method per op, ``def op(self, chunk, **params)``.

    ``run()`` serves chunks from the work queue until Ctrl-C or SIGTERM (or
    ``stop()`` from another thread). All servers on one queue must offer the
    same ops; give another set of ops its own QUEUE, on both sides.
    """

    QUEUE: ClassVar[str] = WORK_QUEUE
    # Chunks in hand at most: 2 takes one ahead while ops are short; 1 never does.
    MAX_PREFETCH: ClassVar[int] = 2

    def __init__(self, rabbit_host: str | None = None) -> None:
        self._url = resolve(rabbit_host)
        parameters(self._url)
        self.host = socket.gethostname()
        self._ops = self.ops()
        self._stopping = threading.Event()
        self._aborting = threading.Event()
        self._in_hand: int | None = None  # delivery tag of the chunk being worked on
        self._in_hand_from = ""  # the consumer it came through
        self._started = 0.0  # when its op started
        self._long_op_check: object = None  # the timer that looks again at SHORT_OP into it
        self._waiting: collections.deque[_Chunk] = collections.deque()  # received, not started
        self._consumers: list[str] = []  # ours on self._channel: 2 while taking a chunk ahead
        self._ahead: str | None = None  # the one of them that takes a chunk ahead
        self._short_ops = 0  # ops in a row shorter than SHORT_OP
        self._channel: BlockingChannel | None = None  # the channel that replies go out on
        self._announced = False
        self._worker_inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()

    @classmethod
    def ops(cls) -> list[str]:
        """The names of the ops this executor offers: its public methods."""
        base = set(dir(OpExecutor))
        return sorted(
            name
            for name in dir(cls)
            if not name.startswith("_") and name not in base and callable(getattr(cls, name))
        )

    def stop(self) -> None:
        """Stop taking chunks; ``run()`` returns after the chunks in hand are finished."""
        self._stopping.set()

    def run(self) -> None:
        """Serve until stopped. Raises BrokerError if the broker cannot be reached
        at first, stays away for RECONNECT_FOR seconds, or refuses our queues."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._on_signal)
            signal.signal(signal.SIGTERM, self._on_signal)
        # One worker thread for the executor's life (daemon: a second Ctrl-C
        # must not wait for an op to finish).
        threading.Thread(target=self._work_forever, name="distop-op", daemon=True).start()
        lost_since: float | None = None
        backoff = 0.5
        while not self._stopping.is_set():
            try:
                connection = connect(self._url)
            except BrokerError:
                if lost_since is None or time.monotonic() - lost_since > RECONNECT_FOR:
                    raise
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            lost_since, backoff = None, 0.5
            try:
                self._serve(connection)
            except pika.exceptions.AMQPConnectionError as exc:
                LOGGER.warning("lost the broker (%s); reconnecting", type(exc).__name__)
                lost_since = time.monotonic()
            except pika.exceptions.AMQPChannelError as exc:
                raise BrokerError(f"the broker refused: {exc}") from exc

    def _on_signal(self, _signum: int, _frame: object) -> None:
        if self._stopping.is_set():
            self._aborting.set()  # a second Ctrl-C: give the chunk back now
        else:
            LOGGER.info("stopping after the chunk in hand (again to stop at once)")
            self._stopping.set()

    def _serve(self, connection: pika.BlockingConnection) -> None:
        self._in_hand, self._long_op_check = None, None
        self._waiting.clear()  # a lost connection's chunks are back in the queue
        self._tick(connection)
        channel: BlockingChannel | None = None
        while not self._stopping.is_set():
            if channel is None or channel.is_closed:
                channel = connection.channel()
                channel.add_on_cancel_callback(self._on_cancelled)
                self._channel = channel
            self._declare(channel)
            if self._stopping.is_set():
                break
            try:
                self._consume(connection, channel)
            except pika.exceptions.ChannelClosedByBroker as exc:
                # The connection is fine; only this channel is gone, and with
                # it the chunk in hand went back to the queue.
                LOGGER.warning("%s; serving on a new channel", _channel_closed_reason(exc))
                connection.process_data_events(time_limit=1.0)  # no busy loop if it happens again
        self._wait_for_chunk_in_hand(connection)
        connection.close()  # anything still unacked goes back to the queue
        LOGGER.info("stopped")

    def _declare(self, channel: BlockingChannel) -> None:
        """Declare our queues; BrokerError if the broker refuses them."""
        try:
            channel.exchange_declare(DEAD_LETTER_EXCHANGE, "headers", durable=True)
            channel.queue_declare(DEAD_LETTER_QUEUE, durable=True, arguments=DEAD_LETTER_QUEUE_ARGUMENTS)
            # No binding arguments: this queue gets every dead letter.
            channel.queue_bind(DEAD_LETTER_QUEUE, DEAD_LETTER_EXCHANGE)
            channel.queue_declare(self.QUEUE, durable=True, arguments=WORK_QUEUE_ARGUMENTS)
        except pika.exceptions.ChannelClosedByBroker as exc:
            # E.g. a queue of that name exists with other arguments: retrying won't help.
            raise BrokerError(f"the broker refused our queues: {exc}") from exc

    def _consume(self, connection: pika.BlockingConnection, channel: BlockingChannel) -> None:
        """Serve chunks on ``channel`` until stopped, or until it has no consumer of ours left.

        That is when the broker cancels our consumer, or when a long op made
        us cancel the last one (see _on_long_op).
        """
        # Chunks waiting from a closed channel are back in the queue.
        self._waiting = collections.deque(chunk for chunk in self._waiting if chunk.channel is channel)
        self._consumers, self._ahead = [], None  # cancelled, or on a closed channel
        # A chunk still running from a closed channel, or a long op, finishes
        # first, so that the next one does not wait unacknowledged behind it.
        self._wait_for_chunk_in_hand(connection)
        # One chunk at a time per consumer: fair dispatch, and a crash strands only one.
        channel.basic_qos(prefetch_count=1)
        self._add_consumer(connection, channel)
        if not self._announced:
            LOGGER.info(
                "serving %s on %r at %s; Ctrl-C to stop", ", ".join(self._ops), self.QUEUE, redact(self._url)
            )
            self._announced = True
        # Returns once _tick() calls stop_consuming(), or the broker cancels
        # our consumer; raises ChannelClosedByBroker if it closes the channel.
        channel.start_consuming()

    def _tick(self, connection: pika.BlockingConnection) -> None:
        """Every half second, on the connection's thread: stop consuming once asked to stop."""
        channel = self._channel
        if self._stopping.is_set() and channel is not None and channel.is_open:
            channel.stop_consuming()
            self._consumers, self._ahead = [], None
        if connection.is_open:
            connection.call_later(0.5, lambda: self._tick(connection))

    def _on_cancelled(self, _frame: Method) -> None:
        LOGGER.warning("the broker cancelled our consumer (was %r deleted?); declaring it again", self.QUEUE)

    def _wait_for_chunk_in_hand(self, connection: pika.BlockingConnection) -> None:
        # Short waits, so that a second signal is noticed promptly. A chunk
        # waiting behind the one in hand is started when that one is finished.
        while self._in_hand is not None and not self._aborting.is_set():
            connection.process_data_events(time_limit=0.5)

    def _add_consumer(
        self, connection: pika.BlockingConnection, channel: BlockingChannel, *, ahead: bool = False
    ) -> None:
        on_message = functools.partial(self._on_message, connection)
        # A lower priority: the broker gives it a chunk only while every
        # server's first consumer has one.
        arguments = {"x-priority": -1} if ahead else None
        consumer = channel.basic_consume(self.QUEUE, on_message, arguments=arguments)
        self._consumers.append(consumer)
        if ahead:
            self._ahead = consumer

    def _cancel_consumer(self, channel: BlockingChannel, consumer: str) -> None:
        """Cancel one of our consumers, only ever one holding a chunk: nothing is on its way to it."""
        if consumer in self._consumers and channel.is_open:
            self._consumers.remove(consumer)
            if consumer == self._ahead:
                self._ahead = None
            channel.basic_cancel(consumer)

    # Pipelining. With one chunk at a time, each ack must settle through the
    # quorum queue's log before the next chunk comes: for short ops, most of a
    # server's time. So while ops are short, a second consumer (prefetch 1
    # too: basic_qos changes only consumers created after it) takes the next
    # chunk while this one runs, but only when every server has one already
    # (consumer priority). A chunk must never wait behind a long op while
    # another server could run it: see _on_long_op.

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
            # Only once per chunk: a return counts towards its DELIVERY_LIMIT.
            if not chunk.redelivered:
                LOGGER.debug("gave back a chunk waiting behind a long op")
                self._waiting.remove(chunk)
                channel.basic_reject(chunk.tag, requeue=True)
        if len(self._consumers) > 1 and self._in_hand_from == self._ahead:
            self._cancel_consumer(channel, self._ahead)  # it holds the op in hand

    def _on_message(
        self,
        connection: pika.BlockingConnection,
        channel: BlockingChannel,
        method: Basic.Deliver,
        props: BasicProperties,
        body: bytes,
    ) -> None:
        try:
            request = _parse_request(props, body)
        except (ValueError, RecursionError) as exc:  # json: RecursionError on deep nesting
            # Requeueing it would only bring it back; the dead-letter queue keeps it.
            LOGGER.warning("rejected a malformed message (%d bytes): %s", len(body), exc)
            channel.basic_reject(method.delivery_tag, requeue=False)
            return
        chunk = _Chunk(
            channel, method.delivery_tag, method.consumer_tag, bool(method.redelivered), props, request
        )
        if self._in_hand is None:
            self._start(connection, chunk)
            return
        self._waiting.append(chunk)
        if time.monotonic() - self._started > SHORT_OP:
            self._on_long_op(channel, self._in_hand)

    def _start(self, connection: pika.BlockingConnection, chunk: _Chunk) -> None:
        self._in_hand, self._in_hand_from, self._started = chunk.tag, chunk.consumer, time.monotonic()
        if len(self._consumers) > 1:  # a chunk may be waiting behind this op, or coming
            check = functools.partial(self._on_long_op, chunk.channel, chunk.tag)
            self._long_op_check = connection.call_later(SHORT_OP, check)
        # The op runs off this thread so that heartbeats keep flowing.
        self._worker_inbox.put((connection, chunk.channel, chunk.tag, chunk.props, chunk.request))

    def _work_forever(self) -> None:
        """The worker thread: run each op handed over by _start, whatever it raises."""
        while True:
            connection, channel, tag, props, request = self._worker_inbox.get()
            started = time.monotonic()
            try:
                body = self._run(request, props.correlation_id)
            except BaseException as exc:  # SystemExit in an op must not end this thread
                body = self._encode(self._error_reply(exc))
            short = time.monotonic() - started < SHORT_OP
            finish = functools.partial(self._finish, connection, channel, tag, props, body, short)
            try:
                connection.add_callback_threadsafe(finish)
            except pika.exceptions.AMQPError:
                LOGGER.warning("connection lost during the op; the broker will deliver the chunk again")
                self._in_hand = None

    def _run(self, request: dict[str, Any], chunk_id: str) -> bytes:
        """Run the op and return the encoded reply: its result, or the error it raised."""
        name = request["op"]
        if name not in self._ops:
            error = UnknownOpError(f"no op {name!r} here; this server offers: {', '.join(self._ops)}")
            LOGGER.warning("chunk %s: %s", chunk_id, error)
            return self._encode(self._error_reply(error))
        started = time.perf_counter()
        try:
            result = getattr(self, name)(request["chunk"], **request["params"])
        except BaseException as exc:  # even SystemExit becomes an error reply
            LOGGER.warning("chunk %s: %s raised %s: %s", chunk_id, name, type(exc).__name__, _text(exc))
            return self._encode(self._error_reply(exc))
        LOGGER.info(
            "chunk %s: %s on %d items in %.3f s",
            chunk_id,
            name,
            len(request["chunk"]),
            time.perf_counter() - started,
        )
        try:
            return codec.dumps({"result": result})
        except (TypeError, ValueError, RecursionError) as exc:
            error = TypeError(f"the result is not JSON-serialisable: {_text(exc)}")
            LOGGER.warning("chunk %s: %s", chunk_id, error)
            return self._encode(self._error_reply(error))

    def _error_reply(self, exc: BaseException) -> dict[str, Any]:
        return {"error": {"type": type(exc).__name__, "message": _text(exc), "host": self.host}}

    def _encode(self, reply: dict[str, Any]) -> bytes:
        try:
            return json.dumps(reply).encode()
        except Exception:  # say something rather than nothing
            error = {"type": "Error", "message": "the error cannot be encoded", "host": self.host}
            return json.dumps({"error": error}).encode()

    def _finish(  # noqa: PLR0917 (a callback's arguments, bound by functools.partial)
        self,
        connection: pika.BlockingConnection,
        channel: BlockingChannel,
        tag: int,
        props: BasicProperties,
        body: bytes,
        short: bool,
    ) -> None:
        """On the connection's thread: reply first, then ack, so no chunk is acked unanswered.

        If the chunk's channel was closed meanwhile (the op ran past the
        broker's consumer_timeout), the chunk is already back in the queue:
        the reply still goes out, on the current channel, and the client
        ignores the duplicate that follows. Then the next chunk, if one waits.
        """
        self._in_hand = None
        if self._long_op_check is not None:
            connection.remove_timeout(self._long_op_check)
            self._long_op_check = None
        self._short_ops = self._short_ops + 1 if short else 0
        current = self._channel
        if current is None or not current.is_open:
            return
        reply_props = BasicProperties(content_type=JSON, correlation_id=props.correlation_id)
        current.basic_publish("", props.reply_to, body, reply_props)
        # Left with only the consumer that takes chunks ahead (a long op made
        # us cancel the other): swap it for a first consumer while it holds this chunk.
        swap = (
            channel is current
            and self._consumers == [self._in_hand_from] == [self._ahead]
            and not self._stopping.is_set()
        )
        if swap:
            self._cancel_consumer(channel, self._in_hand_from)
        if channel is current:
            channel.basic_ack(tag)
        if swap:
            self._add_consumer(connection, current)
        while self._waiting and self._waiting[0].channel is not current:
            self._waiting.popleft()  # back in the queue with its channel
        if self._waiting:
            self._start(connection, self._waiting.popleft())
        else:
            self._pipeline_if_short(connection, current)


@dataclass
class _Chunk:
    """A chunk a server has received: where from, and the request in it."""

    channel: BlockingChannel
    tag: int
    consumer: str  # the consumer tag it came through
    redelivered: bool
    props: BasicProperties
    request: dict[str, Any]


def _text(exc: BaseException) -> str:
    """``str(exc)``, even for an exception whose ``__str__`` raises."""
    try:
        return str(exc)
    except Exception:
        return f"<{type(exc).__name__} whose message cannot be shown>"


def _channel_closed_reason(exc: pika.exceptions.ChannelClosedByBroker) -> str:
    """One line saying why the broker closed a channel, and what to do when we know."""
    if exc.reply_code == 406 and "acknowledgement" in exc.reply_text and "timed out" in exc.reply_text:
        return (
            "the broker closed the channel: a chunk's op ran past its consumer_timeout, so the chunk went "
            "back to the queue (raise consumer_timeout in rabbitmq.conf, or per queue with the "
            "x-consumer-timeout argument on RabbitMQ 3.12+)"
        )
    return f"the broker closed the channel ({exc.reply_code} {exc.reply_text})"


def _parse_request(props: BasicProperties, body: bytes) -> dict[str, Any]:
    """Return the chunk request in ``body``; raise ValueError saying what is wrong."""
    if not props.reply_to:
        raise ValueError("no reply_to")
    if not props.reply_to.startswith(REPLY_QUEUE_PREFIX) or props.reply_to == REPLY_QUEUE_PREFIX:
        # Only a queue the broker named for a client: a chunk must not make us
        # publish into someone else's queue.
        raise ValueError(
            f"reply_to {props.reply_to[:80]!r} is not a client's reply queue ({REPLY_QUEUE_PREFIX}...)"
        )
    if not props.correlation_id:
        raise ValueError("no correlation_id")
    request = codec.loads(body)  # ValueError (or UnicodeDecodeError, a ValueError) if not JSON
    if not isinstance(request, dict):
        raise ValueError("not a JSON object")
    if not isinstance(request.get("op"), str):
        raise ValueError('"op" is not a string')
    if not isinstance(request.get("chunk"), list):
        raise ValueError('"chunk" is not a list')
    if not isinstance(request.get("params", {}), dict):
        raise ValueError('"params" is not an object')
    request.setdefault("params", {})
    return request
