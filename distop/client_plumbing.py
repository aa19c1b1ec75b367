"""The plumbing under distop's client; the RabbitMQ story is _ClientLink in distop/dist_op.py, which calls it.

- IOThread: the thread that runs pika's loop, for the life of one _ClientLink: reconnection with back-off
  to each node in turn, starting over on a new connection after a nack or a return, giving up (every
  pending job fails with one error), shutdown, and a bug in a callback, which fails the pending jobs
  instead of hanging them (IOThread.run, GuardedSelectConnection).
- JobBook: the jobs' bookkeeping on the I/O thread: which chunks to publish (again), which job a reply is
  for, filing a partial result.
- Job, and DistOp's argument checks.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pika
from pika.adapters.select_connection import IOLoop

from distop import codec
from distop.broker import explain, parameters, redact
from distop.errors import BrokerError, DistOpError
from distop.protocol import CORRELATION_ID, MAX_BACKOFF, RECONNECT_FOR, error_text

if TYPE_CHECKING:
    from distop.dist_op import _ClientLink

LOGGER = logging.getLogger(__name__)

# After a nack, start over on a new connection after this pause, doubled up to the maximum.
NACK_BACKOFF = 0.1
MAX_NACK_BACKOFF = 2.0


class GuardedSelectConnection(pika.SelectConnection):
    """A pika.SelectConnection that hands an exception raised in one of our callbacks to ``on_bug``.

    pika calls the callbacks for what the broker sends (replies, confirms, returns, channels opened) while
    it reads the socket, and takes whatever they raise for a lost connection: the client would reconnect
    and publish every pending chunk again, and again. A bug must fail the jobs instead, with one error.
    It overrides a private pika method: pika has no public hook for that error, and a guard around each
    callback instead would stand between every step of the story and its pika call.
    """

    def __init__(
        self, node: pika.ConnectionParameters, on_bug: Callable[[Exception], None], **kwargs: Any
    ) -> None:
        self._on_bug = on_bug
        super().__init__(node, **kwargs)

    def _proto_data_received(self, data: bytes) -> None:  # pika's entry for the bytes the broker sent
        try:
            super()._proto_data_received(data)
        except Exception as exc:
            self._on_bug(exc)


class IOThread(threading.Thread):
    """The thread of one _ClientLink: its pika IOLoop, connections that come and go, and the end.

    Other threads only start it (start_and_wait), hand it work (through ``ioloop.add_callback_threadsafe``)
    and close it (close).
    """

    def __init__(self, url: str, link: _ClientLink, book: JobBook) -> None:
        super().__init__(name="distop-client", daemon=True)
        self.ioloop = IOLoop()
        self.failed = False  # given up, or ended: the next call() makes a new link
        self._url = url
        self._link = link
        self._book = book
        self._nodes = parameters(url)  # each connection attempt tries the next
        self._attempts: list[BaseException] = []  # why each node failed, until one answers
        self._ready = threading.Event()  # the caller's wait for the first connection
        self._error: DistOpError | None = None
        self._ever_connected = False
        self._lost_since: float | None = None
        self._backoff = 0.5
        self._closing = False
        self._start_over_in: float | None = None  # set while closing a connection to start over
        self._start_over_pause = NACK_BACKOFF  # doubles at each start over, back to NACK_BACKOFF at an ack

    @property
    def stopping(self) -> bool:
        """Closing or given up: a channel or connection that closes now is not a failure to handle."""
        return self._closing or self.failed

    # Called from the caller's thread ---------------------------------------

    def start_and_wait(self, timeout: float) -> None:
        self.start()
        if not self._ready.wait(timeout):
            self.close()
            self.failed = True
            raise BrokerError(f"cannot connect to {redact(self._url)}: timed out")
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._closing = True
        if self.is_alive():
            self.ioloop.add_callback_threadsafe(self._shutdown)
            if threading.current_thread() is not self:
                self.join(10)

    # On the I/O thread -------------------------------------------------------

    def run(self) -> None:
        self.ioloop.add_callback_threadsafe(self._connect)
        try:
            while True:
                try:
                    self.ioloop.start()  # returns once stop() is called
                    break
                except Exception as exc:  # raised by a callback the loop called: a timer, a hand-over
                    self.bug(exc)  # fails the jobs, closes the connection; the loop runs until it is closed
        finally:
            # Whatever ended the loop, no job waits for a thread that is gone.
            self.failed = True
            self._book.fail_pending(self._error or DistOpError("the distop client's connection was closed"))
            self._ready.set()
            self.ioloop.close()

    def _connect(self) -> None:
        self._nodes.append(self._nodes.pop(0))  # the first, the first time
        self._link.connect(self._nodes[-1])

    def connected(self) -> None:
        """A connection is ready: the caller's wait ends, and the next loss starts a fresh back-off."""
        self._ever_connected = True
        self._lost_since, self._backoff = None, 0.5
        self._ready.set()

    def bug(self, exc: Exception) -> None:
        """An exception in one of our callbacks: fail the pending jobs with it rather than hang them."""
        LOGGER.error("unexpected error in the client's I/O thread", exc_info=exc)
        self.give_up(DistOpError(f"the distop client failed: {type(exc).__name__}: {error_text(exc)}"))

    def on_open_error(self, _connection: pika.SelectConnection, error: BaseException) -> None:
        self._attempts.append(error)
        if self._ever_connected or len(self._attempts) < len(self._nodes):
            self.reconnect_later()
        else:
            # Never reached any node: say why at once rather than retry.
            self.give_up(explain(self._url, *self._attempts))

    def connection_lost(self, reason: Exception) -> None:
        """The connection closed: stop if we meant it, else reconnect after a pause."""
        if self.stopping:
            self.ioloop.stop()
            return
        if self._start_over_in is not None:  # closed by start_over, which said why
            pause, self._start_over_in = self._start_over_in, None
            self.ioloop.call_later(pause, self._connect)
            return
        LOGGER.warning("lost the broker (%s); reconnecting", reason)
        self.reconnect_later()

    def confirmed(self) -> None:
        """The broker acked a chunk: the next start over comes after the shortest pause again."""
        self._start_over_pause = NACK_BACKOFF

    def start_over(self, why: str) -> None:
        """Close the connection; after a pause, a new one publishes every chunk not yet answered.

        For a nack, a return, a channel the broker closed, or our consumer cancelled (our reply queue
        deleted): the contract is to publish again what the broker refused or dropped, and a new connection
        does that and more: it declares the work queue and a reply queue again, and publishes the chunks whose
        replies went with the old reply queue too (duplicate replies are ignored). RabbitMQ 3.10: a new
        channel, not the same one: on a 3.10 cluster, a channel opened just as a node died can keep pointing
        at the queue's dead leader and nack everything published on it (fixed in 3.12.5); a new channel finds
        the new leader.
        """
        connection = self._link.connection
        if self._start_over_in is not None or connection is None or not connection.is_open:
            return  # starting over already (nacks come in batches), or the connection is going anyway
        pause = self._start_over_pause
        self._start_over_pause = min(pause * 2, MAX_NACK_BACKOFF)
        LOGGER.warning(
            "%s; publishing every chunk not yet answered again in %.1f s, on a new connection", why, pause
        )
        self._start_over_in = pause
        connection.close()  # then connection_lost

    def reconnect_later(self) -> None:
        now = time.monotonic()
        if self._lost_since is None:
            self._lost_since = now
        if now - self._lost_since > RECONNECT_FOR:
            self.give_up(
                BrokerError(f"lost {redact(self._url)} and could not reconnect within {RECONNECT_FOR:.0f} s")
            )
            return
        self.ioloop.call_later(self._backoff, self._connect)
        self._backoff = min(self._backoff * 2, MAX_BACKOFF)

    def give_up(self, error: DistOpError) -> None:
        """Fail every pending job with ``error`` and end the thread."""
        self.failed = True
        self._error = error
        self._book.fail_pending(error)
        self._ready.set()
        self._shutdown()

    def _shutdown(self) -> None:
        connection = self._link.connection
        if connection is not None and connection.is_open:
            connection.close()  # the link's close callback calls connection_lost, which stops the loop
        else:
            self.ioloop.stop()


class JobBook:
    """The jobs, and the chunks to publish: shared with the caller's thread, under ``cond``."""

    def __init__(self, cond: threading.Condition, jobs: dict[str, Job]) -> None:
        self.cond = cond  # guards jobs and _new; notified when a job changes
        self.jobs = jobs
        self._new: list[str] = []  # job ids submitted since the outbox was last filled
        self._outbox: collections.deque[tuple[str, int]] = collections.deque()  # (job id, start)

    def add(self, job: Job) -> None:
        """From the caller's thread: a new job, whose chunks take_new() puts in the outbox."""
        with self.cond:
            self.jobs[job.id] = job
            self._new.append(job.id)

    def take_new(self) -> None:
        with self.cond:
            for job_id in self._new:
                if job_id in self.jobs:  # not cancelled or collected since call() filed it
                    self._outbox.extend((job_id, start) for start in self.jobs[job_id].requests)
            self._new.clear()

    def refill_outbox_with_unanswered_chunks(self) -> None:
        """The outbox holds every chunk whose result has not arrived, in order, and nothing else."""
        with self.cond:
            self._new.clear()
            self._outbox = collections.deque(
                (job.id, start)
                for job in self.jobs.values()
                if not job.done
                for start in job.requests
                if start not in job.partials
            )

    def next_chunk(self) -> tuple[str, int, bytes] | None:
        """The next chunk in the outbox whose job still waits for it: (job id, start, body); None if none."""
        with self.cond:
            while self._outbox:
                job_id, start = self._outbox.popleft()
                job = self.jobs.get(job_id)
                if job is not None and not job.done and start not in job.partials:
                    return job_id, start, job.requests[start]
        return None  # the others were collected, failed or cancelled meanwhile

    def chunk_answered(self, correlation_id: object) -> tuple[Job, int] | None:
        """The job a reply is for, and its chunk's start, if the job still waits for it; else None."""
        match = CORRELATION_ID.fullmatch(correlation_id if isinstance(correlation_id, str) else "")
        if match is None:
            LOGGER.warning("dropped a reply whose correlation_id is not JOB:START: %.80r", correlation_id)
            return None
        job_id, start = match[1], int(match[2])
        with self.cond:
            job = self.jobs.get(job_id)
            if job is None or job.done or start not in job.requests or start in job.partials:
                LOGGER.debug("dropped a reply for %s: unknown, late or duplicate", match[0])
                return None
            return job, start

    def file(self, job: Job, start: int, outcome: Any) -> None:
        """File a partial result under its job, or fail the job if ``outcome`` is a DistOpError."""
        with self.cond:
            if isinstance(outcome, DistOpError):
                job.fail(outcome)
            else:
                job.partials[start] = outcome
            if job.done or job.watched:  # one wake-up per job, not one per partial
                self.cond.notify_all()

    def note_malformed(self, job: Job, why: str) -> None:
        """A reply for ``job`` could not be read: its TimeoutError, if it comes to that, gives ``why``."""
        with self.cond:
            job.malformed = why

    def fail_pending(self, error: DistOpError) -> None:
        with self.cond:
            for job in self.jobs.values():
                job.fail(error)
            self.cond.notify_all()


@dataclass
class Job:
    """One call(): its encoded chunk requests and what has come back so far."""

    id: str
    requests: dict[int, bytes]  # start index -> request body
    partials: dict[int, Any] = field(default_factory=dict)
    error: DistOpError | None = None
    watched: bool = False  # a get_result() with a progress callback wants every partial
    malformed: str = ""  # why the last unreadable reply for one of its chunks was dropped

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
        why_late: Callable[[], str],
    ) -> None:
        """Wait on ``cond`` (held) until the job is done, reporting progress; TimeoutError past it, saying
        ``why_late()``.

        ``timeout`` None or math.inf: no timeout. Before any wait: TypeError if not a number (a bool is
        not one), ValueError if negative or NaN.
        """
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)):
            raise TypeError(f"timeout must be a number of seconds or None, not {type(timeout).__name__}")
        if timeout is not None and not timeout >= 0:  # NaN is not >= 0 either
            raise ValueError(f"timeout must be 0 or more seconds, not {timeout}")
        deadline = None if timeout in (None, math.inf) else time.monotonic() + timeout
        self.watched = self.watched or progress is not None
        reported = -1
        while not self.done:
            if progress is not None and len(self.partials) != reported:
                reported = len(self.partials)
                # Not holding cond: progress may call the DistOp back (close(), cancel()), and close() waits
                # for the I/O thread, which needs cond to file what arrives.
                cond.release()
                try:
                    progress(reported, len(self.requests))
                finally:
                    cond.acquire()
                continue  # the job may have changed meanwhile: look again before waiting
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(
                    f"job {self.id}: {len(self.partials)} of {len(self.requests)} partial results "
                    f"within {timeout} s ({self.malformed or why_late()})"
                )
            # At most TIMEOUT_MAX at a time (about 292 years): a longer wait raises OverflowError.
            cond.wait(None if remaining is None else min(remaining, threading.TIMEOUT_MAX))


def pending_job(jobs: dict[str, Job], job_id: str | None) -> Job:
    if job_id is None:
        if len(jobs) != 1:
            raise ValueError(f"{len(jobs)} jobs are pending: say which one with job_id")
        return next(iter(jobs.values()))
    try:
        return jobs[job_id]
    except KeyError:
        raise ValueError(f"no pending job {job_id!r}") from None


def checked_data(
    op_name: str, class_name: str, data: list[Any], group_size: int, rabbit_host: str | None
) -> list[Any]:
    """``data`` as a list, once DistOp's arguments are checked: TypeError or ValueError if wrong."""
    if not op_name:
        raise TypeError(f"{class_name} must set OP_NAME to the name of the server's op")
    # A list (or a tuple, a range); not a str, which would be cut into characters, nor a set, in no order.
    if isinstance(data, str | bytes | bytearray) or not isinstance(data, Sequence):
        raise TypeError(f"data must be a list, not {type(data).__name__}")
    if rabbit_host is not None and not isinstance(rabbit_host, str):
        raise TypeError(f"rabbit_host must be a str, a host name or URL, not {type(rabbit_host).__name__}")
    data = list(data)  # our own copy
    if not data:
        raise ValueError("data must be a non-empty list")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, not {type(group_size).__name__}")
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, not {group_size}")
    check_json(data, "data")
    return data


def check_json(value: object, name: str) -> None:
    """TypeError unless ``value`` is JSON a server can read: JSON's types, no NaN, text UTF-8 can hold."""
    try:
        codec.dumps(value)
    except UnicodeEncodeError as exc:  # JSON goes out as UTF-8, which cannot hold half a UTF-16 pair
        half = exc.object[exc.start]
        raise TypeError(
            f"{name} must be JSON-serialisable: {half!r} is half a UTF-16 pair, which UTF-8 cannot carry"
        ) from None
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError(f"{name} must be JSON-serialisable: {exc}") from None
