"""The client side of distop: DistOp scatters a job's chunks over the servers and gathers their replies.

Pairs with distop/op_executor.py (the servers); read distop/protocol.py first (the queues, the
messages). Guarantee: every chunk of a job is published with a publisher confirm, again after a
reconnection or a nack, until its partial result is in; get_result() then returns them gathered, in
order, or raises one error saying why not (an op raised, a poison chunk, the broker, the timeout).

Read it in this order:

1. DistOp, the interface: call() publishes a job and returns its id at once; get_result() waits.
2. _ClientLink, the RabbitMQ story, in the order things happen on each (re)connection: connect,
   open a channel, declare the dead-letter exchange and the work queue, declare our own reply queue
   and bind it to the dead-letter exchange, consume the replies, put a second channel in confirm
   mode, publish the chunks, count the confirms, file each reply under its job.
3. The plumbing: the publishing channel replaced after a nack (_Publisher), reconnection, the jobs'
   bookkeeping (_Job). The guard around every callback is in distop/io_thread.py.

Why a SelectConnection on a thread of its own, not a BlockingConnection: call() must return at once
while replies keep arriving, confirms are pipelined rather than waited for one by one, and jobs in
flight survive a reconnection, which the thread makes without the caller's help. The caller's thread
only hands jobs over (add_callback_threadsafe) and waits on a condition in get_result().
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pika
import pika.exceptions
from pika.adapters.select_connection import IOLoop
from pika.channel import Channel
from pika.frame import Method
from pika.spec import Basic, BasicProperties

from distop import codec
from distop.broker import explain, parameters, redact, resolve
from distop.errors import BrokerError, DistOpError, RemoteError
from distop.io_thread import guarded
from distop.protocol import (
    CLIENT_HEADER,
    CORRELATION_ID,
    DEAD_LETTER_EXCHANGE,
    JSON,
    MAX_BACKOFF,
    RECONNECT_FOR,
    WORK_QUEUE,
    WORK_QUEUE_ARGUMENTS,
    dead_letter_error,
    decode_reply,
    error_text,
    refused,
    split,
)

LOGGER = logging.getLogger(__name__)

# Chunks published but not yet confirmed by the broker, at most.
PUBLISH_WINDOW = 1000
# After a nack, publish again on a new channel after this pause, doubled up to the maximum.
NACK_BACKOFF = 0.1
MAX_NACK_BACKOFF = 2.0
CONNECT_TIMEOUT = 60.0


# The interface, used from the caller's thread --------------------------------


class DistOp:
    """The client side of a scatter/gather op; subclass it, set OP_NAME, override gather().

    ``data`` is a non-empty list of JSON-serialisable items, split into
    ``group_size`` chunks (one per server). ``rabbit_host`` is a host name or
    an amqp(s):// URL; without it, ``AMQP_URL``, then localhost. Nothing
    connects until the first ``call()``. Use it as a context manager, or call
    ``close()``, to release the connection.
    """

    OP_NAME: str = ""  # the name of the servers' op; set per object if chosen at run time
    QUEUE: ClassVar[str] = WORK_QUEUE

    def __init__(self, data: list[Any], group_size: int = 1, rabbit_host: str | None = None) -> None:
        self.data = _checked_data(self, data, group_size)
        self.group_size = group_size
        self._url = resolve(rabbit_host)
        parameters(self._url)  # a malformed URL fails here, not at the first call
        self._cond = threading.Condition()  # guards _jobs; notified when a job changes
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
        self._link.submit(_Job(job_id, requests))  # the I/O thread publishes its chunks
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
        with self._cond:
            job = _pending_job(self._jobs, job_id)
            job.wait_done(self._cond, timeout, progress, self.OP_NAME)  # TimeoutError: the job stays
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
            job.fail(DistOpError(f"job {job_id} was cancelled"))
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
                job.fail(DistOpError(f"job {job.id}: the client was closed before the job completed"))
            self._cond.notify_all()

    def __enter__(self) -> DistOp:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


# The RabbitMQ story, on the I/O thread: each callback starts the next step ----


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
        self._client_id = uuid.uuid4().hex  # our dead chunks come back to us on this header
        self._ioloop = IOLoop()
        self._connection: pika.SelectConnection | None = None
        self._channel: Channel | None = None  # declarations, then the reply consumer
        self._reply_queue = ""  # set only while this connection's reply queue is consumed
        self._publisher = _Publisher()  # the channel the chunks go out on, and their confirms
        self._outbox: collections.deque[tuple[str, int]] = collections.deque()  # (job id, start)
        self._republish_all = False  # set by each new connection
        # Plumbing: connection attempts, reconnection, the caller's wait for the first connection.
        self._nodes = parameters(url)  # each connection attempt tries the next
        self._attempts: list[BaseException] = []  # why each node failed, until one answers
        self._ready = threading.Event()
        self._error: DistOpError | None = None
        self._ever_connected = False
        self._lost_since: float | None = None
        self._backoff = 0.5
        self._closing = False
        self.failed = False

    @guarded
    def _connect(self) -> None:
        self._nodes.append(self._nodes.pop(0))  # try the next node (the first, the first time)
        # Asynchronous: every step below is a callback that pika calls when the broker answers.
        self._connection = pika.SelectConnection(
            self._nodes[-1],
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed,
            custom_ioloop=self._ioloop,
        )

    @guarded
    def _on_open(self, connection: pika.SelectConnection) -> None:
        # A channel: a lightweight session inside the connection; AMQP commands go on one.
        connection.channel(on_open_callback=self._on_channel_open)

    @guarded
    def _on_channel_open(self, channel: Channel) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        # The dead-letter exchange, where the work queue sends the chunks it gives up on. A headers
        # exchange routes on message headers, not on a routing key. Declared alike by every server.
        channel.exchange_declare(
            DEAD_LETTER_EXCHANGE, "headers", durable=True, callback=self._declare_work_queue
        )

    @guarded
    def _declare_work_queue(self, _frame: Method) -> None:
        assert self._channel is not None
        # Durable, quorum, with a delivery limit and the dead-letter exchange, exactly as the servers
        # declare it: whoever comes first creates it, so a client may start before any server.
        self._channel.queue_declare(
            self._queue, durable=True, arguments=WORK_QUEUE_ARGUMENTS, callback=self._declare_reply_queue
        )

    @guarded
    def _declare_reply_queue(self, _frame: Method) -> None:
        assert self._channel is not None
        # Exclusive and server-named ("amq.gen-..."): ours alone, deleted with this connection.
        self._channel.queue_declare("", exclusive=True, callback=self._bind_reply_queue)

    @guarded
    def _bind_reply_queue(self, frame: Method) -> None:
        assert self._channel is not None
        queue_name = frame.method.queue  # the name the broker chose
        # Chunks carry our client id in a header, and a dead-lettered chunk keeps its headers: this
        # binding brings our dead chunks back to us. x-match all: every header listed must match.
        self._channel.queue_bind(
            queue_name,
            DEAD_LETTER_EXCHANGE,
            arguments={"x-match": "all", CLIENT_HEADER: self._client_id},
            callback=lambda _frame: self._consume_replies(queue_name),
        )

    @guarded
    def _consume_replies(self, queue_name: str) -> None:
        assert self._channel is not None
        # auto_ack: a reply's only destination is this process's memory.
        self._channel.basic_consume(queue_name, self._on_reply, auto_ack=True)
        self._reply_queue = queue_name
        self._republish_all = True  # a new connection: everything in flight goes out again
        self._open_publisher()

    def _open_publisher(self) -> None:
        if self._connection is not None and self._connection.is_open and self._reply_queue:
            # A second channel for publishing: one given up after a nack leaves the consumer alone.
            self._connection.channel(on_open_callback=self._on_publisher_open)

    @guarded
    def _on_publisher_open(self, channel: Channel) -> None:
        self._publisher.opened(channel)
        channel.add_on_close_callback(self._on_publisher_closed)
        # Publisher confirms: the broker acks each chunk once the queue has it (on disk: it is persistent).
        channel.confirm_delivery(self._on_confirm, callback=lambda _frame: self._on_publisher_ready(channel))

    @guarded
    def _on_publisher_ready(self, channel: Channel) -> None:
        if not self._publisher.ready(channel):
            return  # given up meanwhile
        if self._republish_all:
            self._republish_all = False
            self._republish_pending()  # replies to the old reply queue are gone with it
        self._publish()

    @guarded
    def _publish_new(self) -> None:
        with self._cond:
            for job_id in self._new:
                self._outbox.extend((job_id, start) for start in self._jobs[job_id].requests)
            self._new.clear()
        self._publish()

    def _publish(self) -> None:
        channel = self._publisher.channel
        if channel is None or not channel.is_open or not self._reply_queue:
            return
        while self._outbox and len(self._publisher.unconfirmed) < PUBLISH_WINDOW:
            job_id, start = self._outbox.popleft()
            with self._cond:
                job = self._jobs.get(job_id)
                if job is None or job.done or start in job.partials:
                    continue  # collected, failed or cancelled meanwhile
                body = job.requests[start]
            # Persistent: it survives a broker restart. reply_to and correlation_id: where the reply
            # goes, and what it answers. The header brings the chunk back to us if it is dead-lettered.
            properties = BasicProperties(
                content_type=JSON,
                delivery_mode=pika.DeliveryMode.Persistent,
                reply_to=self._reply_queue,
                correlation_id=f"{job_id}:{start}",
                headers={CLIENT_HEADER: self._client_id},
            )
            channel.basic_publish("", self._queue, body, properties)
            self._publisher.published((job_id, start))  # its confirm will name it by delivery tag

    @guarded
    def _on_confirm(self, frame: Method) -> None:
        # An ack (or nack) names chunks by delivery tag, their number on this channel: 1, 2, 3...
        if not self._publisher.is_current(frame):
            return  # from a channel given up after a nack: its chunks are in the outbox again
        if isinstance(frame.method, Basic.Nack):
            # The broker could not take them: on a new channel, after a pause (see _Publisher).
            count = len(self._publisher.tags(frame.method))
            self._publish_again_later(f"the broker refused {count} chunk(s)")
            return
        self._publisher.confirmed(frame.method)
        self._publish()  # room in the window for more

    @guarded
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
        job_id, start = match[1], int(match[2])  # which job, and where in its data
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.done or start not in job.requests or start in job.partials:
                LOGGER.debug("dropped a reply for %s: unknown, late or duplicate", correlation_id)
                return
            headers = props.headers if isinstance(props.headers, dict) else {}
            # A dead letter is the chunk itself, come back through our binding on the dead-letter
            # exchange; the broker's x-death header says why it died.
            if method.exchange == DEAD_LETTER_EXCHANGE and "x-death" in headers:
                job.error = dead_letter_error(job_id, start, headers)
            else:
                try:
                    reply = decode_reply(body)
                except (ValueError, RecursionError) as exc:  # json: RecursionError on deep nesting
                    LOGGER.warning(
                        "dropped a malformed reply for %s: %s", correlation_id, error_text(exc)[:200]
                    )
                    return
                if isinstance(reply, RemoteError):
                    job.error = reply
                else:
                    job.partials[start] = reply.result
            if job.done or job.watched:  # one wake-up per job, not one per partial
                self._cond.notify_all()

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
        self._ioloop.add_callback_threadsafe(self._publish_new)  # only this thread may use pika

    def close(self) -> None:
        self._closing = True
        if self.is_alive():
            self._ioloop.add_callback_threadsafe(self._shutdown)
            if threading.current_thread() is not self:
                self.join(10)

    # Plumbing on the I/O thread: the loop, reconnection, republishing, refusals, shutdown ---

    def run(self) -> None:
        try:
            self._connect()
            self._ioloop.start()
        except Exception as exc:
            LOGGER.exception("unexpected error in the client's I/O thread")
            self._error = DistOpError(f"the distop client failed: {type(exc).__name__}: {error_text(exc)}")
        finally:
            # Whatever ended the loop, no job waits for a thread that is gone.
            self.failed = True
            self._fail_pending(self._error or DistOpError("the distop client's connection was closed"))
            self._ready.set()
            self._ioloop.close()

    def _republish_pending(self) -> None:
        """A new connection is ready: every chunk whose result has not arrived goes out again.

        Replies sent to a lost connection's reply queue are gone with it; duplicates are ignored.
        """
        self._ever_connected = True
        self._lost_since, self._backoff = None, 0.5
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

    @guarded
    def _shutdown(self) -> None:
        if self._connection is not None and self._connection.is_open:
            self._connection.close()  # _on_closed stops the loop
        else:
            self._ioloop.stop()

    @guarded
    def _on_open_error(self, _connection: pika.SelectConnection, error: BaseException) -> None:
        self._attempts.append(error)
        if self._ever_connected or len(self._attempts) < len(self._nodes):
            self._reconnect_later()
        else:
            # Never reached any node: say why at once rather than retry.
            self._give_up(explain(self._url, *self._attempts))

    @guarded
    def _on_closed(self, _connection: pika.SelectConnection, reason: Exception) -> None:
        # Nothing of this connection may be used again: not its channels, and
        # not its reply queue, which the broker deletes with it.
        self._channel = None
        self._publisher.forget()
        self._reply_queue = ""
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
                job.fail(error)
            self._cond.notify_all()

    @guarded
    def _on_channel_closed(self, _channel: Channel, reason: Exception) -> None:
        if self._closing or self.failed or not isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            return
        if not self._reply_queue:
            # A declaration refused, e.g. the work queue exists with other
            # arguments: retrying won't help.
            self._give_up(BrokerError(refused(reason)))
        elif self._connection is not None and self._connection.is_open:
            # Our replies were consumed on it: start over on a new connection.
            LOGGER.warning("the broker closed the reply channel (%s); reconnecting", reason)
            self._connection.close()

    @guarded
    def _on_publisher_closed(self, channel: Channel, reason: Exception) -> None:
        if channel is not self._publisher.opening:
            return  # one we gave up on purpose
        if self._closing or self.failed or not isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            self._publisher.forget()
            return
        self._publish_again_later(f"the broker closed the publishing channel ({reason})")

    def _publish_again_later(self, why: str) -> None:
        """Give up the publishing channel; its unconfirmed chunks go out first on a new one, after a pause."""
        chunks, pause = self._publisher.give_up()
        LOGGER.warning("%s; publishing again on a new channel in %.1f s", why, pause)
        self._outbox.extendleft(reversed(chunks))
        self._ioloop.call_later(pause, self._reopen_publisher)

    @guarded
    def _reopen_publisher(self) -> None:
        if self._publisher.opening is None:
            self._open_publisher()


class _Publisher:
    """The channel the chunks are published on, in confirm mode, and the chunks it has not confirmed.

    A channel that nacks is given up, not published on again: on a cluster, a
    channel can keep pointing at a queue leader that died, and nack everything
    (RabbitMQ before 3.12.5); a new channel finds the new leader. The pause
    before the next channel doubles from NACK_BACKOFF up to MAX_NACK_BACKOFF,
    and starts again from NACK_BACKOFF at the first ack.
    """

    def __init__(self) -> None:
        self.opening: Channel | None = None  # the newest channel, from its opening on
        self.channel: Channel | None = None  # the same, once in confirm mode: publish on it
        self.unconfirmed: dict[int, tuple[str, int]] = {}  # delivery tag -> (job id, start)
        self._next_tag = 1
        self._backoff = NACK_BACKOFF

    def opened(self, channel: Channel) -> None:
        self.opening = channel

    def ready(self, channel: Channel) -> bool:
        """``channel`` is in confirm mode: publish on it, if it was not given up meanwhile."""
        if channel is not self.opening:
            return False
        self.channel = channel
        self._next_tag = 1  # a channel numbers its deliveries from 1
        self.unconfirmed.clear()
        return True

    def published(self, chunk: tuple[str, int]) -> None:
        self.unconfirmed[self._next_tag] = chunk
        self._next_tag += 1

    def is_current(self, frame: Method) -> bool:
        return self.channel is not None and frame.channel_number == self.channel.channel_number

    def tags(self, method: Basic.Ack | Basic.Nack) -> list[int]:
        """The delivery tags an ack or nack covers (``multiple``: every tag up to its own)."""
        if method.multiple:
            # Tags go in increasing: stop at the first beyond, not scan all 1,000.
            return list(itertools.takewhile(lambda tag: tag <= method.delivery_tag, self.unconfirmed))
        return [method.delivery_tag]

    def confirmed(self, method: Basic.Ack) -> None:
        for tag in self.tags(method):
            self.unconfirmed.pop(tag, None)
        self._backoff = NACK_BACKOFF

    def give_up(self) -> tuple[list[tuple[str, int]], float]:
        """Close and forget the channel; return its unconfirmed chunks, in order, and the pause to wait."""
        channel = self.channel
        chunks = [self.unconfirmed[tag] for tag in sorted(self.unconfirmed)]
        self.forget()
        pause, self._backoff = self._backoff, min(self._backoff * 2, MAX_NACK_BACKOFF)
        if channel is not None and channel.is_open:
            channel.close()
        return chunks, pause

    def forget(self) -> None:
        """The channel is gone (or its connection is): nothing of it may be used again."""
        self.channel = self.opening = None
        self.unconfirmed.clear()


# The jobs' bookkeeping -----------------------------------------------------------


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

    def fail(self, error: DistOpError) -> None:
        if not self.done:
            self.error = error

    def wait_done(
        self,
        cond: threading.Condition,
        timeout: float | None,
        progress: Callable[[int, int], None] | None,
        op_name: str,
    ) -> None:
        """Wait on ``cond`` (held) until the job is done, reporting progress; TimeoutError past it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.watched = self.watched or progress is not None
        reported = -1
        while not self.done:
            if progress is not None and len(self.partials) != reported:
                reported = len(self.partials)
                progress(reported, len(self.requests))
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(
                    f"job {self.id}: {len(self.partials)} of {len(self.requests)} partial results "
                    f"within {timeout} s (is a server serving {op_name!r}?)"
                )
            cond.wait(remaining)


def _pending_job(jobs: dict[str, _Job], job_id: str | None) -> _Job:
    if job_id is None:
        if len(jobs) != 1:
            raise ValueError(f"{len(jobs)} jobs are pending: say which one with job_id")
        return next(iter(jobs.values()))
    try:
        return jobs[job_id]
    except KeyError:
        raise ValueError(f"no pending job {job_id!r}") from None


def _checked_data(op: DistOp, data: list[Any], group_size: int) -> list[Any]:
    """``data`` as a list, once DistOp's arguments are checked: TypeError or ValueError if wrong."""
    if not op.OP_NAME:
        raise TypeError(f"{type(op).__name__} must set OP_NAME to the name of the server's op")
    data = list(data)
    if not data:
        raise ValueError("data must be a non-empty list")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, not {type(group_size).__name__}")
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, not {group_size}")
    _check_json(data, "data")
    return data


def _check_json(value: object, name: str) -> None:
    try:
        codec.dumps(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError(f"{name} must be JSON-serialisable: {exc}") from None
