"""The plumbing of distop's client; the RabbitMQ story it serves is _ClientLink in distop/dist_op.py.

- pika_callback: a bug in a callback fails the pending jobs; the I/O thread never dies silently.
- _LinkPlumbing, which _ClientLink extends: the thread and its loop, reconnection and giving up, a
  channel the broker closed, shutdown, and the jobs' bookkeeping: which chunks to publish (again), and
  which job each reply belongs to.
- _Publisher: the publishing channel, given up for a new one after a nack, and its unconfirmed chunks.
- _Job, and DistOp's argument checks.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
from pika.adapters.select_connection import IOLoop
from pika.channel import Channel
from pika.frame import Method
from pika.spec import Basic

from distop import codec
from distop.broker import explain, parameters, redact
from distop.errors import BrokerError, DistOpError
from distop.protocol import CORRELATION_ID, MAX_BACKOFF, RECONNECT_FOR, error_text, refused

LOGGER = logging.getLogger(__name__)

# After a nack, publish again on a new channel after this pause, doubled up to the maximum.
NACK_BACKOFF = 0.1
MAX_NACK_BACKOFF = 2.0


def pika_callback(method: Callable[..., None]) -> Callable[..., None]:
    """Mark a method that pika calls on the I/O thread: a bug in it fails the pending jobs.

    Unguarded, an exception escaping a callback is taken by pika for a lost connection (the client
    would reconnect and publish every pending chunk again, and again) or ends its loop (get_result()
    would wait for a thread that is gone).
    """

    @functools.wraps(method)
    def guarded(self: _LinkPlumbing, *args: Any) -> None:
        try:
            method(self, *args)
        except Exception as exc:
            LOGGER.exception("unexpected error in the client's I/O thread")
            self._give_up(DistOpError(f"the distop client failed: {type(exc).__name__}: {error_text(exc)}"))

    return guarded


class _LinkPlumbing(threading.Thread):
    """Everything _ClientLink needs besides the RabbitMQ story.

    Its thread runs one pika IOLoop for its whole life; connections come and go inside it. Other
    threads only submit jobs (submit) and close it (close).
    """

    # Set by the story, _ClientLink: the connection, its two channels, and the reply queue's name
    # while it is consumed.
    _connection: pika.SelectConnection | None
    _channel: Channel | None
    _publisher: _Publisher
    _reply_queue: str

    def __init__(self, url: str, cond: threading.Condition, jobs: dict[str, _Job]) -> None:
        super().__init__(name="distop-client", daemon=True)
        self._url = url
        self._ioloop = IOLoop()
        self._cond = cond  # guards jobs and _new; notified when a job changes
        self._jobs = jobs
        self._new: list[str] = []  # job ids submitted since the last (re)connection
        self._outbox: collections.deque[tuple[str, int]] = collections.deque()  # (job id, start)
        self._redeclaring = False  # a chunk came back: the work queue is being declared again
        self._nodes = parameters(url)  # each connection attempt tries the next
        self._attempts: list[BaseException] = []  # why each node failed, until one answers
        self._ready = threading.Event()  # the caller's wait for the first connection
        self._error: DistOpError | None = None
        self._ever_connected = False
        self._lost_since: float | None = None
        self._backoff = 0.5
        self._closing = False
        self.failed = False

    # The story's steps that the plumbing starts again (see _ClientLink).
    def _connect(self) -> None:
        raise NotImplementedError

    def _open_publisher(self) -> None:
        raise NotImplementedError

    def _publish(self) -> None:
        raise NotImplementedError

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

    # On the I/O thread: its loop, and the jobs' bookkeeping ------------------

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

    def _next_node(self) -> pika.ConnectionParameters:
        self._nodes.append(self._nodes.pop(0))  # the first, the first time
        return self._nodes[-1]

    def _connected(self) -> None:
        """A connection is ready: every chunk whose result has not arrived goes out again.

        Replies sent to a lost connection's reply queue are gone with it; duplicates are ignored.
        """
        self._ever_connected = True
        self._lost_since, self._backoff = None, 0.5
        self._outbox_every_unanswered_chunk()
        self._ready.set()

    def _outbox_every_unanswered_chunk(self) -> None:
        with self._cond:
            self._new.clear()
            self._outbox = collections.deque(
                (job.id, start)
                for job in self._jobs.values()
                if not job.done
                for start in job.requests
                if start not in job.partials
            )

    @pika_callback
    def _publish_new(self) -> None:
        with self._cond:
            for job_id in self._new:
                self._outbox.extend((job_id, start) for start in self._jobs[job_id].requests)
            self._new.clear()
        self._publish()

    def _next_chunk(self) -> tuple[str, int, bytes] | None:
        """The next chunk in the outbox whose job still waits for it: (job id, start, body); None if none."""
        with self._cond:
            while self._outbox:
                job_id, start = self._outbox.popleft()
                job = self._jobs.get(job_id)
                if job is not None and not job.done and start not in job.partials:
                    return job_id, start, job.requests[start]
        return None  # the others were collected, failed or cancelled meanwhile

    def _chunk_answered(self, correlation_id: object) -> tuple[_Job, int] | None:
        """The job a reply is for, and its chunk's start, if the job still waits for it; else None."""
        match = CORRELATION_ID.fullmatch(correlation_id if isinstance(correlation_id, str) else "")
        if match is None:
            LOGGER.warning("dropped a reply whose correlation_id is not JOB:START: %.80r", correlation_id)
            return None
        job_id, start = match[1], int(match[2])
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.done or start not in job.requests or start in job.partials:
                LOGGER.debug("dropped a reply for %s: unknown, late or duplicate", match[0])
                return None
            return job, start

    def _file(self, job: _Job, start: int, outcome: Any) -> None:
        """File a partial result under its job, or fail the job if ``outcome`` is a DistOpError."""
        with self._cond:
            if isinstance(outcome, DistOpError):
                job.fail(outcome)
            else:
                job.partials[start] = outcome
            if job.done or job.watched:  # one wake-up per job, not one per partial
                self._cond.notify_all()

    def _first_return(self, channel: Channel) -> bool:
        """True for the first chunk returned since the work queue was last declared."""
        if channel is not self._publisher.channel or self._redeclaring:
            return False  # one of a batch, or from a channel given up after a nack
        self._redeclaring = True
        return True

    @pika_callback
    def _publish_unanswered(self, _frame: Method) -> None:
        """The work queue is declared again: as on a reconnection, every chunk not yet answered goes out.

        The deleted queue took with it those that waited in it; duplicates of the others are ignored.
        """
        self._redeclaring = False
        self._outbox_every_unanswered_chunk()
        self._publish()

    # Reconnection, refusals, shutdown ----------------------------------------

    @pika_callback
    def _shutdown(self) -> None:
        if self._connection is not None and self._connection.is_open:
            self._connection.close()  # _on_closed stops the loop
        else:
            self._ioloop.stop()

    @pika_callback
    def _on_open_error(self, _connection: pika.SelectConnection, error: BaseException) -> None:
        self._attempts.append(error)
        if self._ever_connected or len(self._attempts) < len(self._nodes):
            self._reconnect_later()
        else:
            # Never reached any node: say why at once rather than retry.
            self._give_up(explain(self._url, *self._attempts))

    @pika_callback
    def _on_closed(self, _connection: pika.SelectConnection, reason: Exception) -> None:
        # Nothing of this connection may be used again: not its channels, and
        # not its reply queue, which the broker deletes with it.
        self._channel = None
        self._publisher.forget()
        self._reply_queue = ""
        self._redeclaring = False  # the next connection declares the queue and publishes everything
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

    @pika_callback
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

    @pika_callback
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

    @pika_callback
    def _reopen_publisher(self) -> None:
        if self._publisher.opening is None:
            self._open_publisher()


class _Publisher:
    """The channel the chunks are published on, in confirm mode, and the chunks it has not confirmed.

    A channel that nacks is given up, not published on again: on a cluster, a
    channel can keep pointing at a queue leader that died, and nack everything
    (a workaround for RabbitMQ before 3.12.5, harmless after); a new channel finds the new leader. The pause
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


def pending_job(jobs: dict[str, _Job], job_id: str | None) -> _Job:
    if job_id is None:
        if len(jobs) != 1:
            raise ValueError(f"{len(jobs)} jobs are pending: say which one with job_id")
        return next(iter(jobs.values()))
    try:
        return jobs[job_id]
    except KeyError:
        raise ValueError(f"no pending job {job_id!r}") from None


def checked_data(op_name: str, class_name: str, data: list[Any], group_size: int) -> list[Any]:
    """``data`` as a list, once DistOp's arguments are checked: TypeError or ValueError if wrong."""
    if not op_name:
        raise TypeError(f"{class_name} must set OP_NAME to the name of the server's op")
    data = list(data)
    if not data:
        raise ValueError("data must be a non-empty list")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, not {type(group_size).__name__}")
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, not {group_size}")
    check_json(data, "data")
    return data


def check_json(value: object, name: str) -> None:
    try:
        codec.dumps(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError(f"{name} must be JSON-serialisable: {exc}") from None
