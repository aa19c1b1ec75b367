"""The distop server: OpExecutor takes chunks off the work queue, runs the op each names, and replies.

Run it as distop/callee.py does (``python distop/callee.py``; the ops are there). Read distop/serve_one.py
first, the same server at its simplest, and distop/protocol.py, the queues and the messages. The story
comes first in OpExecutor, in serve_one.py's order; the class docstring maps it. What it adds to
serve_one.py, and why: the op on a worker thread (an op may run for minutes while pika answers the
broker's heartbeats), reconnection and a new channel after a consumer_timeout (failures), Ctrl-C that
finishes the chunk in hand (failures), and the ops as methods of your subclass (the interface).

Guarantee: a chunk is acked only after its reply is published, so a server that dies mid-chunk loses
nothing: the broker gives the chunk to another server. Limits: the op may then run twice (at-least-once
delivery), and an op that outlasts the broker's consumer_timeout runs again.

Why a BlockingConnection: one chunk at a time reads best as plain calls. pika answers the broker's
heartbeats only while the connection's thread is inside pika, so the op runs on a worker thread while
the connection's thread waits in start_consuming(): an op may run for minutes. The story takes that as
one step (_run_off_io_thread); how the worker thread does it comes after the story, under "Plumbing",
with reconnection and signals.

distop/pipelined.py is an optimisation for very short ops, a subclass that takes a chunk ahead; it is
not needed to follow the lesson.
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.frame import Method
from pika.spec import Basic, BasicProperties

from distop import codec
from distop.broker import Connection, connect, parameters, redact, resolve
from distop.errors import BrokerError
from distop.protocol import (
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    DEAD_LETTER_QUEUE_ARGUMENTS,
    JSON,
    MAX_BACKOFF,
    RECONNECT_FOR,
    WORK_QUEUE,
    WORK_QUEUE_ARGUMENTS,
    error_text,
    parse_request,
    refused,
)

LOGGER = logging.getLogger(__name__)


class UnknownOpError(Exception):
    """Raised on the server, and sent back, when a chunk names an op it does not have."""


class ResultTooLargeError(Exception):
    """Sent back when the broker refused a chunk's reply as larger than its max_message_size."""


@dataclass
class Chunk:
    """A chunk a server has received: where from, and the request in it."""

    channel: BlockingChannel  # the channel it came on: only that one can ack it
    tag: int  # its delivery tag on that channel
    consumer: str  # the consumer tag it came through
    redelivered: bool
    props: BasicProperties  # reply_to and correlation_id: where the reply goes, and under which id
    request: dict[str, Any]
    op_seconds: float = 0.0  # how long its op ran, once it has (PipelinedOpExecutor reads it)


class OpExecutor:
    """The server side: subclass it with one method per op, ``def op(self, chunk, **params)``.

    ``run()`` serves chunks from the work queue until Ctrl-C or SIGTERM (or ``stop()`` from another
    thread). All servers on one queue must offer the same ops; give another set its own QUEUE, on both sides.

    The story below, in the order it happens (as in distop/serve_one.py); run() (plumbing, after the story)
    connects, and calls it on each new channel:
      _declare         exchange_declare, queue_declare,     where the chunks it gives up on go: distop.dead
                       queue_bind
                       queue_declare(QUEUE)                 the work queue, shared by every server
      _consume         basic_qos(prefetch_count=1)          one unacked chunk per server: fair dispatch
                       basic_consume(QUEUE, _on_chunk)      each chunk goes to one server
      _on_chunk        basic_reject(requeue=False)          a malformed chunk is dead-lettered
                       _run_off_io_thread                   the op may run for minutes: heartbeats go on
      _run_op          (on the worker thread)               the op's result, or the error it raised
      _reply_and_ack   basic_publish("", reply_to)          the reply, quoting the chunk's correlation_id
                       basic_ack                            only now: a server that dies leaves it to another

    What goes wrong, and what the code does (docs/distop.md has the whole table, with its tests):

      a malformed chunk            _on_chunk: rejected without requeue, so dead-lettered to distop.dead
      hostile text in a chunk      _run_op: its id, op name and errors logged escaped (%r) and cut
      the op raises, or is unknown _run_op: the error is the reply; RemoteError at the client
      this server dies mid-chunk   not acked: the broker gives the chunk to another server
      a chunk that kills servers   the queue delivers it 5 times at most, then dead-letters it;
                                   its client gets PoisonChunkError
      the broker is lost           run: reconnect; not consuming again within RECONNECT_FOR (a node may
                                   answer, yet fail to declare a quorum queue): one line with why, exit 1
      an op past consumer_timeout  _serve: the broker closed the channel; one line, a new channel
      the work queue is deleted    _on_cancelled, then _serve declares it again
      the queue declared otherwise _declare: one line, exit 1
      Ctrl-C or SIGTERM            _on_signal: finish the chunk in hand, exit 0; a second: at once;
                                   none in hand while connecting or declaring: at once
    """

    QUEUE: ClassVar[str] = WORK_QUEUE

    def __init__(self, rabbit_host: str | None = None) -> None:
        if rabbit_host is not None and not isinstance(rabbit_host, str):  # as DistOp checks it
            kind = type(rabbit_host).__name__
            raise TypeError(f"rabbit_host must be a str, a host name or URL, not {kind}")
        self._url = resolve(rabbit_host)
        parameters(self._url)  # a malformed URL fails here, before anything connects
        self.host = socket.gethostname()
        self._ops = self.ops()
        self._channel: BlockingChannel | None = None  # the channel that replies go out on
        self._in_hand: int | None = None  # the delivery tag of the chunk whose op is running
        self._worker_inbox: queue.SimpleQueue[tuple[pika.BlockingConnection, Chunk]] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._aborting = threading.Event()
        self._announced = False
        self._consuming = False  # in start_consuming(); if not, nor a chunk in hand, a signal ends run()
        self._down_since: float | None = None  # not consuming since then (run); None while consuming
        self._last_reply: tuple[str, int] | None = None  # (chunk id, size) of the last reply published
        self._too_large: dict[str, str] = {}  # chunk id -> why its reply was refused (_serve), at most 100

    # The RabbitMQ story, in the order it happens ------------------------------

    def _declare(self, channel: BlockingChannel) -> None:
        """Declare where dead chunks go, then the work queue, as the clients do (declaring is idempotent);
        BrokerError if refused."""
        try:
            # Where the work queue sends the chunks it gives up on, declared first, so it is there. A
            # headers exchange: each client binds its reply queue on its own id, so a dead chunk goes back.
            channel.exchange_declare(DEAD_LETTER_EXCHANGE, "headers", durable=True)
            # The queue distop.dead keeps a copy of every dead chunk, for a person to look at: a binding
            # that lists no header takes every message. (An exchange and a queue may share a name.)
            channel.queue_declare(DEAD_LETTER_QUEUE, durable=True, arguments=DEAD_LETTER_QUEUE_ARGUMENTS)
            channel.queue_bind(DEAD_LETTER_QUEUE, DEAD_LETTER_EXCHANGE)
            # The work queue: durable, quorum, with a delivery limit and a dead-letter exchange, declared
            # exactly as the clients declare it (or the broker refuses).
            channel.queue_declare(self.QUEUE, durable=True, arguments=WORK_QUEUE_ARGUMENTS)
        except pika.exceptions.ChannelClosedByBroker as exc:
            # Refused: a queue of that name exists with other arguments. Retrying won't help: exit 1.
            raise BrokerError(refused(exc)) from exc

    def _consume(self, connection: pika.BlockingConnection, channel: BlockingChannel) -> str:
        """Subscribe to the work queue, one chunk at a time; return the consumer tag."""
        # Prefetch 1: at most one unacked chunk here, so the broker gives the next chunk to a free
        # server (fair dispatch), and a server that crashes strands only one.
        channel.basic_qos(prefetch_count=1)
        # Every server consumes the same queue: the broker gives each chunk to one of them.
        # Each arrives in _on_chunk, on this thread, while _serve() waits in start_consuming().
        return channel.basic_consume(self.QUEUE, functools.partial(self._on_chunk, connection))

    def _on_chunk(
        self,
        connection: pika.BlockingConnection,
        channel: BlockingChannel,
        method: Basic.Deliver,
        props: BasicProperties,
        body: bytes,
    ) -> None:
        """A chunk arrived, on the connection's thread: reject it if malformed, else start its op."""
        try:
            # parse_request also checks reply_to: only a broker-named reply queue ("amq.gen-..."), so
            # that a chunk cannot make us publish into any queue it likes (protocol.py says more).
            request = parse_request(props, body)
        except (ValueError, RecursionError) as exc:  # json: RecursionError on deep nesting
            LOGGER.warning("rejected a malformed message (%d bytes): %s", len(body), exc)
            # Not requeued: it would only come back. The work queue dead-letters it, to distop.dead.
            channel.basic_reject(method.delivery_tag, requeue=False)
            return
        chunk = Chunk(
            channel, method.delivery_tag, method.consumer_tag, bool(method.redelivered), props, request
        )
        if (too_large := self._too_large.pop(props.correlation_id, None)) is not None:
            # Back after the broker refused its reply as too large (_serve): the op would only make it again.
            self._reply_and_ack(chunk, self._error_reply(ResultTooLargeError(too_large)))
            return
        # The op runs on a worker thread (_run_op), so that this thread keeps answering the broker's
        # heartbeats however long it takes; then _reply_and_ack runs back on this thread.
        self._run_off_io_thread(connection, chunk)

    def _run_op(self, chunk: Chunk) -> bytes:
        """On the worker thread: run the op; return the encoded reply, its result or the error it raised."""
        request, chunk_id = chunk.request, chunk.props.correlation_id
        # The id, the op name and what the op raised come from the network: logged with %r, cut, so that
        # their control characters cannot forge or break a line.
        name = request["op"]
        if name not in self._ops:
            # An op this server does not have: the reply says so, a RemoteError at the client.
            error = UnknownOpError(f"no op {name[:80]!r} here; this server offers: {', '.join(self._ops)}")
            LOGGER.warning("chunk %.80r: %s", chunk_id, error)
            return self._error_reply(error)
        started = time.perf_counter()
        try:
            result = getattr(self, name)(request["chunk"], **request["params"])
        except BaseException as exc:  # the op raised (even SystemExit): the error is the reply
            LOGGER.warning(
                "chunk %.80r: %s raised %s: %.200r", chunk_id, name, type(exc).__name__, error_text(exc)
            )
            return self._error_reply(exc)
        elapsed = time.perf_counter() - started
        LOGGER.info("chunk %.80r: %s on %d items in %.3f s", chunk_id, name, len(request["chunk"]), elapsed)
        try:
            return codec.dumps({"result": result})
        except (TypeError, ValueError, RecursionError) as exc:  # a result JSON cannot hold: an error reply
            error = TypeError(f"the result is not JSON-serialisable: {error_text(exc)}")
            LOGGER.warning("chunk %.80r: %s", chunk_id, error)
            return self._error_reply(error)

    def _reply_and_ack(self, chunk: Chunk, body: bytes) -> None:
        """Back on the connection's thread, the op done: publish the reply, then ack."""
        channel = self._channel
        if channel is None or not channel.is_open:
            return  # the connection was lost during the op: the chunk is back in the queue, for any server
        props = BasicProperties(content_type=JSON, correlation_id=chunk.props.correlation_id)
        self._last_reply = (chunk.props.correlation_id, len(body))  # for a refusal of its size (_serve)
        # To the client's reply queue (reply_to) by the default exchange, quoting the correlation_id.
        # Our choice: no confirm, not persistent: if the reply is lost with the client's connection, the
        # client publishes the chunk again.
        channel.basic_publish("", chunk.props.reply_to, body, props)
        # Ack only now: until here, a server that dies leaves the chunk to another. Only the channel it came
        # on can ack it; if that one is closed (consumer_timeout), the chunk is back in the queue anyway.
        if chunk.channel is channel:
            channel.basic_ack(chunk.tag)

    # Plumbing: the worker thread -----------------------------------------------

    def _run_off_io_thread(self, connection: pika.BlockingConnection, chunk: Chunk) -> None:
        """Hand the chunk to the worker thread (_work_forever)."""
        # This thread goes back into pika at once: stopping, or consuming on a new channel, waits for
        # the chunk in hand (_wait_for_chunk_in_hand).
        self._in_hand = chunk.tag
        self._worker_inbox.put((connection, chunk))

    def _work_forever(self) -> None:
        """The worker thread: run each op handed over, whatever it raises; hand the reply back."""
        while True:
            connection, chunk = self._worker_inbox.get()
            started = time.monotonic()
            try:
                body = self._run_op(chunk)
            except BaseException as exc:  # SystemExit in an op must not end this thread
                body = self._error_reply(exc)
            chunk.op_seconds = time.monotonic() - started
            try:
                # A BlockingConnection belongs to the thread that opened it: this is the one call another
                # thread may make. _op_done runs on the connection's thread, at its next turn in pika.
                connection.add_callback_threadsafe(functools.partial(self._op_done, connection, chunk, body))
            except pika.exceptions.AMQPError:
                LOGGER.warning("connection lost during the op; the broker will deliver the chunk again")
                self._in_hand = None

    def _op_done(self, connection: pika.BlockingConnection, chunk: Chunk, body: bytes) -> None:
        """On the connection's thread: the op in hand is done; reply and ack (_reply_and_ack)."""
        try:
            self._reply_and_ack(chunk, body)
        finally:
            # Only now: until the ack is sent, a signal must find the chunk in hand (_on_signal) and let
            # it finish, not end the server between the op and its ack.
            self._in_hand = None

    def _wait_for_chunk_in_hand(self, connection: pika.BlockingConnection) -> None:
        # Short waits, so that a second signal is noticed promptly.
        while self._in_hand is not None and not self._aborting.is_set():
            connection.process_data_events(time_limit=0.5)

    def _error_reply(self, exc: BaseException) -> bytes:
        """The encoded reply for an op that raised ``exc``; RemoteError at the client."""
        error = {"type": type(exc).__name__, "message": error_text(exc), "host": self.host}
        try:
            return json.dumps({"error": error}).encode()
        except Exception:  # say something rather than nothing
            error = {"type": "Error", "message": "the error cannot be encoded", "host": self.host}
            return json.dumps({"error": error}).encode()

    # Plumbing: reconnection, channels the broker closes, signals ----------------

    def run(self) -> None:
        """Serve until stopped. Raises BrokerError if the broker cannot be reached at first,
        if we are not consuming again RECONNECT_FOR seconds after losing it (or after starting),
        or if it refuses our queues."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._on_signal)
            signal.signal(signal.SIGTERM, self._on_signal)
        # One worker thread for the executor's life (daemon: a second Ctrl-C
        # must not wait for an op to finish).
        threading.Thread(target=self._work_forever, name="distop-op", daemon=True).start()
        # Reset only once consuming (_serve), not by a mere connect: a node may answer and still fail
        # every declaration (a quorum queue without a majority of its nodes).
        self._down_since = time.monotonic()
        first = True
        backoff = 0.5
        try:
            while not self._stopping.is_set():
                try:
                    connection = connect(self._url)
                except BrokerError:
                    if first or time.monotonic() - self._down_since > RECONNECT_FOR:
                        raise
                    time.sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
                    continue
                first = False
                try:
                    self._serve(connection)
                except pika.exceptions.AMQPConnectionError as exc:
                    # The broker restarted, or the network failed: connect again, for up to RECONNECT_FOR.
                    self._consuming = False
                    consumed = self._down_since is None  # _serve clears it once consuming
                    self._lost(exc)
                    if consumed:
                        backoff = 0.5
                    else:  # lost before consuming on it: not at once, lest we hammer the node
                        time.sleep(backoff)
                        backoff = min(backoff * 2, MAX_BACKOFF)
                except pika.exceptions.AMQPChannelError as exc:
                    raise BrokerError(f"the broker refused: {exc}") from exc
        except _Stopped:
            LOGGER.info("stopped")  # a signal while nothing was in hand (_on_signal)

    def _lost(self, exc: pika.exceptions.AMQPConnectionError) -> None:
        """The connection is lost: say why, start the outage clock; BrokerError once RECONNECT_FOR is out."""
        if isinstance(exc, pika.exceptions.ConnectionClosedByBroker):
            why = f"the broker closed the connection: {exc.reply_code} {exc.reply_text}"
        else:
            why = type(exc).__name__
        if self._down_since is None:
            self._down_since = time.monotonic()
        elif time.monotonic() - self._down_since > RECONNECT_FOR:
            # 541 INTERNAL_ERROR before consuming: RabbitMQ 3.10, a declaration that hung a minute.
            internal = isinstance(exc, pika.exceptions.ConnectionClosedByBroker) and exc.reply_code == 541
            hint = "; a quorum queue without a majority of its nodes?" if internal else ""
            raise BrokerError(
                f"could not serve {self.QUEUE!r} at {redact(self._url)} within {RECONNECT_FOR:.0f} s: "
                f"{why}{hint}"
            ) from exc
        LOGGER.warning("lost the broker (%s); reconnecting", why)

    def stop(self) -> None:
        """Stop taking chunks; ``run()`` returns after the chunks in hand are finished."""
        self._stopping.set()

    @classmethod
    def ops(cls) -> list[str]:
        """The names of the ops this executor offers: its public methods."""
        base = set(dir(OpExecutor))
        return sorted(
            name
            for name in dir(cls)
            if not name.startswith("_") and name not in base and callable(getattr(cls, name))
        )

    def _serve(self, connection: Connection) -> None:
        """Declare and consume, on a new channel whenever the broker closes ours, until stopped."""
        self._in_hand = None  # a lost connection's chunks are back in the queue
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
                # A chunk still running from a closed channel (or a cancelled consumer) finishes first:
                # the next chunk must not wait unacked behind it.
                self._wait_for_chunk_in_hand(connection)
                self._consume(connection, channel)
                self._down_since = None  # consuming again: the outage, if any, is over (run)
                if not self._announced:
                    self._announced = True
                    ops = ", ".join(self._ops)
                    LOGGER.info("serving %s on %r at %s; Ctrl-C to stop", ops, self.QUEUE, connection.node)
                else:  # after a lost connection, or a channel the broker closed
                    LOGGER.info("serving again on %r at %s", self.QUEUE, connection.node)
                # Returns once _tick() calls stop_consuming(), or our consumers are cancelled; raises
                # ChannelClosedByBroker if the broker closes the channel.
                self._consuming = True
                channel.start_consuming()
                self._consuming = False
            except pika.exceptions.ChannelClosedByBroker as exc:
                self._consuming = False
                # The broker closed our channel (an op past its consumer_timeout): the chunk in hand went
                # back to the queue; say why in one line (_channel_closed_reason), serve on a new channel.
                LOGGER.warning("%s; serving on a new channel", _channel_closed_reason(exc))
                self._note_too_large(exc)
                connection.process_data_events(time_limit=1.0)  # no busy loop if it happens again
        self._wait_for_chunk_in_hand(connection)
        connection.close()  # anything still unacked goes back to the queue
        LOGGER.info("stopped")

    def _note_too_large(self, exc: pika.exceptions.ChannelClosedByBroker) -> None:
        """The broker refused our last reply as too large: its chunk, back in the queue, gets that error."""
        if exc.reply_code != 406 or "message size" not in exc.reply_text or self._last_reply is None:
            return
        chunk_id, size = self._last_reply
        self._too_large[chunk_id] = (
            f"the result is {size:,} bytes, more than the broker takes: {exc.reply_text}"
        )
        while len(self._too_large) > 100:  # chunk ids come from the network: keep a few
            self._too_large.pop(next(iter(self._too_large)))

    def _tick(self, connection: pika.BlockingConnection) -> None:
        """Every half second, on the connection's thread: stop consuming once asked to stop."""
        channel = self._channel
        if self._stopping.is_set() and channel is not None and channel.is_open:
            channel.stop_consuming()
        if connection.is_open:
            connection.call_later(0.5, lambda: self._tick(connection))

    def _on_signal(self, _signum: int, _frame: object) -> None:
        """Ctrl-C or SIGTERM: take no more chunks, finish the one in hand; a second one: give it back now."""
        if not self._consuming and self._in_hand is None:
            # Connecting or declaring (which may hang a minute): nothing in hand, so leave the pika call now
            # (run returns; the process ends and the broker sees the connection go).
            self._stopping.set()
            raise _Stopped
        if self._stopping.is_set():
            self._aborting.set()  # a second Ctrl-C: give the chunk back now
        else:
            LOGGER.info("stopping after the chunk in hand (again to stop at once)")
            self._stopping.set()

    def _on_cancelled(self, _frame: Method) -> None:
        """The broker cancelled our consumer (its queue was deleted): _serve declares it again."""
        LOGGER.warning("the broker cancelled our consumer (was %r deleted?); declaring it again", self.QUEUE)


class _Stopped(BaseException):
    """Ctrl-C or SIGTERM with nothing in hand. A BaseException, as KeyboardInterrupt: pika lets it through."""


def _channel_closed_reason(exc: pika.exceptions.ChannelClosedByBroker) -> str:
    """One line saying why the broker closed a channel, and what to do when we know."""
    if exc.reply_code == 406 and "acknowledgement" in exc.reply_text and "timed out" in exc.reply_text:
        return (
            "the broker closed the channel: a chunk's op ran past its consumer_timeout, so the chunk went "
            "back to the queue (raise consumer_timeout in rabbitmq.conf, or per queue with the "
            "x-consumer-timeout argument on RabbitMQ 3.12+)"
        )
    if exc.reply_code == 406 and "message size" in exc.reply_text:
        return (
            f"the broker refused a reply larger than its max_message_size ({exc.reply_text}); its chunk, "
            "back in the queue, will be answered with a ResultTooLargeError"
        )
    return f"the broker closed the channel ({exc.reply_code} {exc.reply_text})"
