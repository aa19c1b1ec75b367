"""distop's client: DistOp splits a job into chunks, one per server, and gathers the servers' partial results.

What you write (distop/caller.py does it):

    class PowOp(DistOp):
        OP_NAME = "pow"  # the servers' op

        def gather(self, partials):  # {start index: partial result}, in order
            return [x for part in partials.values() for x in part]

    with PowOp(data=list(range(10)), group_size=3) as op:
        job_id = op.call(esp=2)  # returns at once (the first call connects first); an I/O thread publishes
        print(op.get_result(job_id, timeout=60))  # waits for every partial, then gathers them

How a job travels:

    call()  --chunks, one message each-->  work queue distop.chunks  -->  servers (OpExecutor), one each
    get_result()  <--gather()--  our reply queue  <--one reply per chunk, same correlation_id--  servers
    a chunk that kills its servers:  distop.chunks --dead-letter--> distop.dead --our binding--> reply queue

Read distop/call_one.py first: the same RPC for one chunk, top to bottom; then distop/call_many.py, many
chunks in flight on a SelectConnection, their dead ones brought back by a headers binding, nothing retried.
_ClientLink, below, is call_many.py on a thread of its own, so that call() returns at once while replies
keep arriving. Its methods are pika callbacks, the first few each called when the broker answers the one
before, then _on_confirm, _on_returned and _on_reply whenever the broker sends one: read them top to bottom
(its docstring maps them, then says what goes wrong and which method deals with it). DistOp, the class you
subclass, follows it. What they add to call_many.py, and why: call() returning at once, with an I/O thread
(the interface); many jobs side by side, up to PUBLISH_WINDOW chunks unconfirmed (speed); starting over
after a nack, a return, a lost connection or a lost reply queue, publishing again every chunk not yet
answered (failures).

Guarantee: every chunk is published persistent, with a publisher confirm, and published again until its
result is in: after a nack, a lost connection, a return, or the loss of our reply queue. get_result()
returns the partials gathered in order, or raises one error saying why not (an op raised, a poison chunk,
the broker lost for a minute, the timeout). Limits: chunks waiting in a work queue deleted under us go out
again only once a later chunk comes back, or on a reconnection; and a job dies with the process that
called it.

The plumbing is in distop/client_plumbing.py: IOThread (the thread, reconnecting, starting over, giving
up), JobBook (which chunks to publish, which job a reply is for).
"""

from __future__ import annotations

import itertools
import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any, ClassVar

import pika
import pika.exceptions
from pika.channel import Channel
from pika.frame import Method
from pika.spec import Basic, BasicProperties

from distop import codec
from distop.broker import parameters, resolve
from distop.client_plumbing import (
    GuardedSelectConnection,
    IOThread,
    Job,
    JobBook,
    check_json,
    checked_data,
    pending_job,
)
from distop.errors import BrokerError, DistOpError, RemoteError, printable
from distop.protocol import (
    CLIENT_HEADER,
    DEAD_LETTER_EXCHANGE,
    JSON,
    WORK_QUEUE,
    WORK_QUEUE_ARGUMENTS,
    dead_letter_error,
    decode_reply,
    error_text,
    refused,
    split,
)

LOGGER = logging.getLogger(__name__)

PUBLISH_WINDOW = 1000  # chunks published but not yet confirmed by the broker, at most
CONNECT_TIMEOUT = 60.0
# A channel closed by the broker with these codes is not started over: ACCESS_REFUSED (the user's
# permissions) and PRECONDITION_FAILED (e.g. a message over the broker's max_message_size) do not pass.
NOT_RETRIED = {403, 406}


class _ClientLink:
    """The client's connection: the RabbitMQ story, in the order it happens on each (re)connection.

        connect              pika.SelectConnection         pika calls the next method when it is open
        _on_open             connection.channel()          one channel: declare, consume replies, publish
        _on_channel_open     exchange_declare("headers")   where the work queue sends dead chunks
                             queue_declare(distop.chunks)  the work queue the servers share
                             queue_declare("", exclusive)  our reply queue, named by the broker
        _on_reply_queue      queue_bind(dead-letter exch.) our dead chunks come back to us too
                             basic_consume(auto_ack)       replies arrive in _on_reply
                             confirm_delivery()            the broker will ack or nack each chunk
        _on_confirm_mode     (every chunk not answered)    published from here on
        _publish             basic_publish                 persistent, mandatory, reply_to, correlation_id
        _on_confirm          basic.ack (or basic.nack)     the broker has the chunks (or refused them)
        _on_reply            a reply, or a dead letter     filed under its job by correlation_id

    What goes wrong, and what the code does (docs/distop.md has the whole table, with its tests). One rule
    for most: start over on a new connection, which declares everything again and publishes every chunk
    not yet answered.

        a nack, a return, a channel closed     _on_nack, _on_returned, _on_channel_closed: start over after
                                               a growing pause (IOThread.start_over)
        our reply queue deleted                _on_cancelled (the broker cancels our consumer): start over
                                               the same way, on a new reply queue
        the connection lost                    _on_closed: reconnect; after a minute, the jobs fail
        a declaration refused (406)            _on_channel_closed: call() raises BrokerError
        a bind or publish refused (403), a     _on_channel_closed: the pending jobs fail with the
        chunk too large (406)                  broker's words (BrokerError)
        nacks, again and again (a queue full)  _on_nack: start over each time; a get_result() that times
                                               out says the broker refuses the chunks (why_late)
        our chunk dead-lettered                _on_reply: PoisonChunkError for its job
        a malformed, forged or late reply      _on_reply: dropped, logged; the job's TimeoutError names
                                               the malformed one
        a bug in one of these callbacks        GuardedSelectConnection: the pending jobs fail with it
        the broker blocks us (memory or disk   _on_blocked: a warning at once; we wait, and a get_result()
        alarm)                                 that times out meanwhile says so (why_late)
    """

    def __init__(self, url: str, queue: str, jobs: JobBook) -> None:
        self._queue = queue
        self._jobs = jobs  # which chunks to publish, which job a reply is for
        self._client_id = uuid.uuid4().hex  # our dead chunks come back to us on this header
        self.connection: pika.SelectConnection | None = None
        self._channel: Channel | None = None  # this connection's channel
        self._reply_queue = ""  # set only while this connection's reply queue is consumed
        self._publishing = False  # the channel is in confirm mode: chunks may go out
        self._unconfirmed: dict[int, tuple[str, int]] = {}  # delivery tag -> (job id, start), until confirmed
        self._next_tag = 1  # the delivery tag of the next chunk published on this channel
        self.blocked = False  # by the broker, short of memory or disk (_on_blocked)
        self.refusing = False  # the broker nacked chunks, and has acked none since (_on_nack)
        self.io = IOThread(url, self, jobs)  # the thread that runs pika's loop; calls connect()

    def connect(self, node: pika.ConnectionParameters) -> None:
        # pika 1.4: a SelectConnection that fails the jobs if one of our callbacks has a bug (no hook for it).
        self.connection = GuardedSelectConnection(
            node,  # a cluster's nodes in turn
            on_bug=self.io.bug,
            on_open_callback=self._on_open,
            on_open_error_callback=self.io.on_open_error,  # no broker: try the next node, or give up
            on_close_callback=self._on_closed,
            # Our own loop, not a new one per connection: the I/O thread runs it for the client's whole
            # life, and the caller's thread hands it work (submit) even while we reconnect.
            custom_ioloop=self.io.ioloop,
        )
        self.connection.add_on_connection_blocked_callback(self._on_blocked)  # a memory or disk alarm
        self.connection.add_on_connection_unblocked_callback(self._on_unblocked)

    def _on_open(self, connection: pika.SelectConnection) -> None:
        # One channel is enough: we declare, consume our replies and publish our chunks on it.
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_channel_open(self, channel: Channel) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)  # the broker refused a command
        channel.add_on_return_callback(self._on_returned)  # a mandatory chunk no queue took
        channel.add_on_cancel_callback(self._on_cancelled)  # the broker cancelled our consumer of replies
        # pika sends each command at once; only the last declare asks to hear back: the broker answers a
        # channel's commands in order, so once the last is answered, all are (a refusal: _on_channel_closed).
        # A headers exchange, declared alike by every server: where the work queue sends dead chunks.
        channel.exchange_declare(DEAD_LETTER_EXCHANGE, "headers", durable=True)
        # Durable, quorum, with a delivery limit, as the servers declare it: whoever comes first creates it.
        channel.queue_declare(self._queue, durable=True, arguments=WORK_QUEUE_ARGUMENTS)
        # Our reply queue: "" lets the broker name it; exclusive: ours alone, gone with this connection.
        channel.queue_declare("", exclusive=True, callback=self._on_reply_queue)

    def _on_reply_queue(self, frame: Method) -> None:
        assert self._channel is not None
        queue_name = frame.method.queue  # the name the broker chose
        # A dead chunk keeps its headers, ours among them: this binding brings it back to us.
        # x-match "all": the binding matches a message whose headers hold every pair listed here.
        self._channel.queue_bind(
            queue_name, DEAD_LETTER_EXCHANGE, arguments={"x-match": "all", CLIENT_HEADER: self._client_id}
        )
        # auto_ack: a reply's only destination is this process's memory; an ack would protect nothing.
        self._channel.basic_consume(queue_name, self._on_reply, auto_ack=True)
        self._reply_queue = queue_name
        # Publisher confirms: the broker acks each chunk once the queue has it (on disk: it is persistent).
        self._channel.confirm_delivery(self._on_confirm, callback=self._on_confirm_mode)

    def _on_confirm_mode(self, _frame: Method) -> None:
        # Every chunk not yet answered: all of them the first time; after a start over, those too whose
        # replies went with the old reply queue (a duplicate reply is ignored).
        self._jobs.refill_outbox_with_unanswered_chunks()
        self._publishing = True  # delivery tags count from 1 on this channel
        self.io.connected()
        self._publish()

    def submit(self, job: Job) -> None:
        """From the caller's thread: file the job, and have this thread publish its chunks."""
        self._jobs.add(job)
        # Only the I/O thread may use pika: add_callback_threadsafe runs _publish_new there.
        self.io.ioloop.add_callback_threadsafe(self._publish_new)

    def _publish_new(self) -> None:
        self._jobs.take_new()  # the new jobs' chunks join those waiting to be published
        self._publish()

    def _publish(self) -> None:
        channel = self._channel
        if not self._publishing or channel is None or not channel.is_open:
            return  # not in confirm mode yet, or starting over: the next channel publishes them
        # Pipelined: up to PUBLISH_WINDOW chunks await their confirm at once.
        while len(self._unconfirmed) < PUBLISH_WINDOW and (chunk := self._jobs.next_chunk()):
            job_id, start, body = chunk
            properties = BasicProperties(
                content_type=JSON,
                delivery_mode=pika.DeliveryMode.Persistent,  # survives a broker restart
                reply_to=self._reply_queue,  # where the server sends the result
                correlation_id=f"{job_id}:{start}",  # what the result answers: job and chunk
                headers={CLIENT_HEADER: self._client_id},  # brings the chunk back to us if it dies
            )
            # The default exchange ("") routes by queue name. mandatory: no queue takes it, it comes back.
            channel.basic_publish("", self._queue, body, properties, mandatory=True)
            self._unconfirmed[self._next_tag] = (job_id, start)  # its confirm will name it by this tag
            self._next_tag += 1

    def _on_confirm(self, frame: Method) -> None:
        method = frame.method
        # A confirm names chunks by delivery tag; multiple: every tag up to delivery_tag, not only that one.
        if method.multiple:  # (tags were filed in increasing order: stop at the first beyond)
            tags = list(itertools.takewhile(lambda tag: tag <= method.delivery_tag, self._unconfirmed))
        else:
            tags = [method.delivery_tag]
        if isinstance(method, Basic.Nack):
            self._on_nack(len(tags))  # the broker refused them: below
            return
        for tag in tags:  # an ack: the broker has them safe
            self._unconfirmed.pop(tag, None)
        self.io.confirmed()  # for what goes wrong: the next start over comes after the shortest pause
        self.refusing = False
        self._publish()  # room in the window for more

    def _on_reply(self, _ch: Channel, method: Basic.Deliver, props: BasicProperties, body: bytes) -> None:
        # The correlation_id, "JOB:START", says which job the reply is for, and where its chunk starts.
        # Anyone allowed to publish to this queue can send anything: what does not check out is dropped.
        found = self._jobs.chunk_answered(props.correlation_id)  # (job, start); None: unknown, late, forged
        if found is None:
            return
        job, start = found
        headers = props.headers if isinstance(props.headers, dict) else {}
        if method.exchange == DEAD_LETTER_EXCHANGE and "x-death" in headers:
            # Not a reply: our chunk itself, dead-lettered, back through our binding. The broker added the
            # header x-death when it dead-lettered it: from which queue, why (e.g. delivery_limit), how often.
            self._jobs.file(job, start, dead_letter_error(job.id, start, headers))
            return
        try:
            reply = decode_reply(body)
        except (ValueError, RecursionError) as exc:  # json: RecursionError on deep nesting
            why = printable(error_text(exc)[:200])
            LOGGER.warning("dropped a malformed reply for %s:%s: %s", job.id, start, why)
            # The job waits on (a forged reply must not fail it); if it times out, its TimeoutError says this.
            self._jobs.note_malformed(
                job, f"the reply for chunk {job.id}:{start} was malformed and dropped: {why}"
            )
            return
        self._jobs.file(job, start, reply if isinstance(reply, RemoteError) else reply.result)

    # What goes wrong, and what we do ------------------------------------------

    def _on_nack(self, count: int) -> None:
        # The broker refused them (a queue at its length limit, an internal error). Any version: publish
        # them again; on a healthy broker, the same channel would do.
        # RabbitMQ 3.10: we start over on a new connection, as after a lost connection (IOThread.start_over).
        self.refusing = True  # until an ack: get_result()'s TimeoutError says so (why_late)
        self.io.start_over(f"the broker refused {count} chunk(s)")

    def _on_returned(self, _ch: Channel, _m: Basic.Return, _props: BasicProperties, _body: bytes) -> None:
        # No queue took the chunk: the work queue was deleted, with every chunk of ours that waited in it.
        # Its ack follows and means "dropped". Start over: the new connection declares the queue again.
        self.io.start_over(f"no queue {self._queue!r} took a chunk")

    def _on_cancelled(self, _frame: Method) -> None:
        # The broker cancels a consumer whose queue is deleted: our reply queue is gone, and the replies
        # in it. Start over: the new connection declares a new one and publishes every chunk not yet answered.
        why = "the broker cancelled our consumer (was our reply queue deleted?)"
        self.io.start_over(why)

    def _on_closed(self, _connection: pika.SelectConnection, reason: Exception) -> None:
        # The connection is gone, and with it its channels and our reply queue (the broker deletes it):
        # nothing of it may be used again. The next connection declares the queue and publishes everything.
        self._channel = None
        self._reply_queue = ""
        self._publishing = False
        self._unconfirmed.clear()  # no confirm will come for these: published again on the next channel,
        self._next_tag = 1  # which counts delivery tags from 1 again
        self.blocked = False
        self.io.connection_lost(reason)  # reconnect after a pause, give up after a minute, or stop if closing

    def _on_channel_closed(self, _channel: Channel, reason: Exception) -> None:
        if self.io.stopping or not isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            return  # we closed it, or its connection went: _on_closed sees to that
        if not self._reply_queue:
            # A declaration refused, e.g. the work queue exists with other arguments: retrying won't help.
            self.io.give_up(BrokerError(refused(reason)))
        elif reason.reply_code in NOT_RETRIED:
            # Refused later, as nothing will mend by itself: a bind or publish this user may not make, a
            # chunk over the broker's max_message_size. The pending jobs fail with the broker's words.
            self.io.give_up(BrokerError(f"the broker refused: {reason}"))
        else:
            # Later, our replies were consumed on it: start over on a new connection.
            self.io.start_over(f"the broker closed the channel ({reason})")

    def _on_blocked(self, _connection: pika.SelectConnection, frame: Method) -> None:
        # A broker short of memory or disk reads nothing more from us until it recovers: no chunk reaches
        # the servers. All we can do is wait, and say why: at once, and in get_result()'s TimeoutError.
        self.blocked = True
        LOGGER.warning(
            "the broker has blocked this connection: %s (memory or disk alarm)", frame.method.reason
        )

    def _on_unblocked(self, _connection: pika.SelectConnection, _frame: Method) -> None:
        self.blocked = False
        LOGGER.info("the broker has unblocked this connection")

    def why_late(self, op_name: str) -> str:
        """The likely reason why a job is late, for get_result()'s TimeoutError."""
        if self.blocked:
            return "the broker has blocked publishing: memory or disk alarm"
        if self.refusing:
            return "the broker refuses the chunks (a nack: a queue at its length limit?)"
        return f"is a server serving {op_name!r}?"


class DistOp:
    """The client side of a scatter/gather op; subclass it, set OP_NAME, override gather().

    ``data`` is a non-empty list of JSON-serialisable items, split into
    ``group_size`` chunks (one per server): a count of chunks, not their size.
    ``rabbit_host`` is a host name or an amqp(s):// URL; without it,
    ``AMQP_URL``, then localhost. Nothing connects until the first ``call()``.
    Use it as a context manager, or call ``close()``, to release the connection.
    """

    OP_NAME: str = ""  # the name of the servers' op; set per object if chosen at run time
    QUEUE: ClassVar[str] = WORK_QUEUE

    def __init__(self, data: list[Any], group_size: int = 1, rabbit_host: str | None = None) -> None:
        self.data = checked_data(self.OP_NAME, type(self).__name__, data, group_size, rabbit_host)
        self.group_size = group_size
        self._url = resolve(rabbit_host)
        parameters(self._url)  # a malformed URL fails here, not at the first call
        self._cond = threading.Condition()  # guards _jobs; notified when a job changes
        self._connecting = threading.Lock()  # one call() at a time makes the connection
        self._jobs: dict[str, Job] = {}
        self._link: _ClientLink | None = None

    def gather(self, partials: dict[int, Any]) -> Any:
        """Combine the partial results, given as ``{start_index: partial}`` in order.

        The default returns the partials as a list, in order.
        """
        return list(partials.values())

    def call(self, **params: Any) -> str:
        """Publish one chunk per server and return the job id at once.

        At once: the chunks are handed to the I/O thread, which publishes them; call() does not wait
        for their confirms or replies. The first call(), and the first after the broker was lost for
        good, connects first, and waits up to CONNECT_TIMEOUT seconds for the connection.

        ``params`` reach the server's op as keyword arguments. Raises
        BrokerError if the broker cannot be reached, TypeError if ``params``
        are not JSON-serialisable (text with half a UTF-16 pair, a lone surrogate, is not).
        """
        check_json(params, "params")
        # The job id goes into each chunk's correlation_id, "JOB_ID:START": a reply names its job and chunk.
        job_id = uuid.uuid4().hex
        # Scatter: one message per chunk, each to be taken by one server from the work queue.
        requests = {
            start: codec.dumps({"op": self.OP_NAME, "chunk": chunk, "params": params})
            for start, chunk in split(self.data, self.group_size)
        }
        with self._connecting:  # threads that call() at once share one connection
            if self._link is None or self._link.io.failed:
                self._link = None
                link = _ClientLink(self._url, self.QUEUE, JobBook(self._cond, self._jobs))
                link.io.start_and_wait(CONNECT_TIMEOUT)  # BrokerError if not; the next call() tries again
                self._link = link
            self._link.submit(Job(job_id, requests))  # the I/O thread publishes them (_ClientLink._publish)
        return job_id

    def get_result(
        self,
        job_id: str | None = None,
        timeout: float | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Any:
        """Block until every partial of the job is in; return ``gather(partials)``.

        ``job_id`` may be left out when exactly one job is pending (else
        ValueError). ``timeout`` is in seconds; None or ``math.inf`` waits for
        ever; negative or NaN: ValueError; not a number (a str, a bool):
        TypeError. ``progress(done, total)`` is called,
        in this thread, as partials arrive. Raises TimeoutError once
        ``timeout`` seconds pass (the job stays pending: you may wait again),
        RemoteError if a server's op raised, PoisonChunkError if a chunk was
        dead-lettered, BrokerError if the broker was lost for good.
        """
        with self._cond:
            job = pending_job(self._jobs, job_id)
            # Replies arrive on the I/O thread (_ClientLink._on_reply), filed by job (correlation_id).
            link = self._link  # set by call(): the job's chunks went out on it
            # TimeoutError: the job stays; its message gives the likely reason (_ClientLink.why_late).
            job.wait_done(self._cond, timeout, progress, lambda: link.why_late(self.OP_NAME) if link else "")
            self._jobs.pop(job.id, None)
        if job.error is not None:
            raise job.error
        if progress is not None:
            progress(len(job.partials), len(job.requests))
        return self.gather(dict(sorted(job.partials.items())))  # gather: the partials in chunk order

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
        with self._connecting:
            if self._link is not None:
                self._link.io.close()
                self._link = None
        with self._cond:
            for job in self._jobs.values():
                job.fail(DistOpError(f"job {job.id}: the client was closed before the job completed"))
            self._cond.notify_all()

    def __enter__(self) -> DistOp:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
