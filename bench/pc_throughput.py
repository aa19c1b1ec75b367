"""Throughput of pc/producer.py and pc/consumer.py against plain pika at its fastest.

    make bench                                           # every benchmark, or just this one:
    python bench/pc_throughput.py --rounds 5 --messages 20000

Two questions, each asked in alternating rounds (the side that goes first
changes every round):

- Producer: how fast does ``pc/producer.py --count N x`` put N persistent,
  confirmed messages into the quorum queue ``pc``? The baseline publishes the
  same bodies, persistent, into the same queue (same type and arguments), on a
  SelectConnection with publisher confirms pipelined over a window of
  BASELINE_WINDOW messages.
- Consumer: how fast does ``pc/consumer.py --quiet`` drain that queue holding
  N messages? The baseline, on a SelectConnection, with a prefetch of
  BASELINE_PREFETCH, acks in batches:
  ``basic_ack(multiple=True)`` every BASELINE_ACK_EVERY messages, and what is
  left when the queue goes quiet.

The goal for both: ours at least GOAL times as fast as the baseline, as the
median over rounds of the ratio of the two runs in a round. Medians of the
rates go beside it, and the CPU time per message of the process measured:
other work on a shared machine slows down some runs and not others, which
moves the rates but hardly the CPU time (the load average is printed before
and after).

Every run is a process timed from start to exit, because that is what users
run: the baselines are subcommands of this script, so interpreter start-up
and connection set-up cost both sides alike. A consumer's run ends when the
queue has no ready message left (this script polls it with a passive
queue.declare every POLL_INTERVAL s); then it gets SIGTERM, and the messages
it had not acknowledged yet go back to the queue and do not count. The queue
is deleted before every run, in a virtual host created for this benchmark
with rabbitmqctl and deleted at the end (PYCLASS_RABBITMQCTL says how to run
rabbitmqctl, as for the tests; AMQP_URL where the broker is).

Exit status 1 when a run fails (no broker, a script exits non-zero or
outlives SIGTERM by STOP_TIMEOUT s, a count comes out wrong); a missed goal is
reported but is not a failure, because it depends on the machine. Ctrl-C or
SIGTERM stops the benchmark, removes what it created, and exits 0.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path

import pika
import pika.exceptions

from bench._table import Comparison, children_cpu, load_average, rabbitmqctl, table, versions
from pc.workqueue import QUEUE, QUEUE_ARGUMENTS  # the queue pc/producer.py and pc/consumer.py use

ROOT = Path(__file__).resolve().parent.parent
TEXT = "x"
GOAL = 0.8
DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"
BASELINE_WINDOW = 5000
BASELINE_PREFETCH = 1000
BASELINE_ACK_EVERY = 250
# How often the baseline consumer acks what it holds while the queue is quiet.
IDLE_ACK_INTERVAL = 0.05
POLL_INTERVAL = 0.005
RUN_TIMEOUT = 120.0
STOP_TIMEOUT = 20.0
PROPERTIES = pika.BasicProperties(content_type="text/plain", delivery_mode=pika.DeliveryMode.Persistent)


def bodies(count: int) -> list[bytes]:
    """What ``pc/producer.py --count N x`` sends, byte for byte."""
    return [f"{TEXT} {i}".encode() for i in range(1, count + 1)]


# The baselines ---------------------------------------------------------------


def publish_fast(url: str, count: int) -> None:
    """Publish ``count`` bodies with pipelined confirms; raise RuntimeError unless all are confirmed."""
    payloads = bodies(count)
    unconfirmed: collections.deque[int] = collections.deque()  # delivery tags, ascending
    sent = 0
    failure: list[str] = []

    def on_open(connection: pika.SelectConnection) -> None:
        connection.channel(on_open_callback=on_channel)

    def on_channel(channel: pika.channel.Channel) -> None:
        def declare(_frame: object) -> None:
            channel.queue_declare(
                QUEUE, durable=True, arguments=QUEUE_ARGUMENTS, callback=lambda _frame: publish(channel)
            )

        channel.confirm_delivery(lambda frame: on_confirm(channel, frame), callback=declare)

    def publish(channel: pika.channel.Channel) -> None:
        nonlocal sent
        while sent < count and len(unconfirmed) < BASELINE_WINDOW:
            channel.basic_publish("", QUEUE, payloads[sent], PROPERTIES)
            sent += 1
            unconfirmed.append(sent)

    def on_confirm(channel: pika.channel.Channel, frame: pika.frame.Method) -> None:
        method = frame.method
        if isinstance(method, pika.spec.Basic.Nack):
            failure.append("the broker refused a message")
            connection.close()
            return
        if method.multiple:
            while unconfirmed and unconfirmed[0] <= method.delivery_tag:
                unconfirmed.popleft()
        else:
            unconfirmed.remove(method.delivery_tag)
        if sent == count and not unconfirmed:
            connection.close()
        else:
            publish(channel)

    def on_open_error(connection: pika.SelectConnection, error: BaseException) -> None:
        failure.append(f"cannot connect: {error!r}")
        connection.ioloop.stop()

    connection = pika.SelectConnection(
        pika.URLParameters(url),
        on_open_callback=on_open,
        on_open_error_callback=on_open_error,
        on_close_callback=lambda connection, _reason: connection.ioloop.stop(),
    )
    connection.ioloop.start()
    if failure or sent < count or unconfirmed:
        raise RuntimeError(failure[0] if failure else f"{len(unconfirmed) + count - sent} not confirmed")


class FastConsumer:
    """Drain the queue on a SelectConnection with batched multi-acks until SIGTERM."""

    def __init__(self, url: str) -> None:
        self._channel: pika.channel.Channel | None = None
        self._unacked = 0
        self._last_tag = 0
        self._failure: str | None = None
        self._connection = pika.SelectConnection(
            pika.URLParameters(url),
            on_open_callback=lambda connection: connection.channel(on_open_callback=self._on_channel),
            on_open_error_callback=self._on_open_error,
            on_close_callback=lambda connection, _reason: connection.ioloop.stop(),
        )

    def run(self) -> None:
        ioloop = self._connection.ioloop
        # The one ioloop call that is safe in a signal handler: it queues stop() for the loop.
        signal.signal(signal.SIGTERM, lambda _signum, _frame: ioloop.add_callback_threadsafe(self._stop))
        ioloop.start()
        if self._failure:
            raise RuntimeError(self._failure)

    def _on_open_error(self, connection: pika.SelectConnection, error: BaseException) -> None:
        self._failure = f"cannot connect: {error!r}"
        connection.ioloop.stop()

    def _on_channel(self, channel: pika.channel.Channel) -> None:
        self._channel = channel
        channel.queue_declare(
            QUEUE,
            durable=True,
            arguments=QUEUE_ARGUMENTS,
            callback=lambda _frame: channel.basic_qos(
                prefetch_count=BASELINE_PREFETCH, callback=self._consume
            ),
        )

    def _consume(self, _frame: object) -> None:
        assert self._channel is not None
        self._channel.basic_consume(QUEUE, self._on_message)
        self._connection.ioloop.call_later(IDLE_ACK_INTERVAL, self._on_timer)

    def _on_message(
        self, _channel: object, method: pika.spec.Basic.Deliver, _props: object, body: bytes
    ) -> None:
        # pc/consumer.py --quiet does nothing with the body either.
        self._unacked += 1
        self._last_tag = method.delivery_tag
        if self._unacked >= BASELINE_ACK_EVERY:
            self._ack()

    def _ack(self) -> None:
        if self._unacked and self._channel is not None and self._channel.is_open:
            self._channel.basic_ack(self._last_tag, multiple=True)
            self._unacked = 0

    def _on_timer(self) -> None:
        self._ack()  # what is left when the queue goes quiet
        self._connection.ioloop.call_later(IDLE_ACK_INTERVAL, self._on_timer)

    def _stop(self) -> None:
        if self._connection.is_open:
            self._ack()  # as pc/consumer.py does
            self._connection.close()


# Timing runs -----------------------------------------------------------------


class Probe:
    """The benchmark's own connection, to reset, fill and watch the queue."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()

    def reset(self) -> None:
        self.channel.queue_delete(QUEUE)

    def fill(self, count: int) -> None:
        publish_fast(self.url, count)

    def status(self) -> tuple[int, int]:
        """Ready messages and consumers in the queue."""
        method = self.channel.queue_declare(QUEUE, passive=True).method
        return method.message_count, method.consumer_count

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


def run_env(url: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "AMQP_URL": url}


def time_producer(probe: Probe, command: list[str], count: int) -> tuple[float, float]:
    """Run a producer to its end into an empty queue.

    Return its rate (messages per second) and its CPU seconds per message.
    """
    probe.reset()
    cpu = children_cpu()
    started = time.perf_counter()
    done = subprocess.run(
        command,
        check=False,
        cwd=ROOT,
        env=run_env(probe.url),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    elapsed = time.perf_counter() - started
    cpu = children_cpu() - cpu
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[1:])} exited {done.returncode}: {done.stderr.strip()}")
    ready, _ = probe.status()
    if ready != count:
        raise RuntimeError(f"{' '.join(command[1:])} left {ready} messages in the queue, not {count}")
    return count / elapsed, cpu / count


def time_consumer(probe: Probe, command: list[str], count: int) -> tuple[float, float]:
    """Time a consumer draining ``count`` messages, until none is ready, then SIGTERM it.

    Return its rate (messages per second) and its CPU seconds per message.
    """
    probe.reset()
    probe.fill(count)
    cpu = children_cpu()
    with tempfile.TemporaryFile("w+") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(command, cwd=ROOT, env=run_env(probe.url), stdout=log, stderr=log)
        try:
            while probe.status()[0] > 0 and proc.poll() is None:
                if time.perf_counter() - started > RUN_TIMEOUT:
                    raise RuntimeError(f"{' '.join(command[1:])} did not drain the queue in {RUN_TIMEOUT} s")
                time.sleep(POLL_INTERVAL)
            elapsed = time.perf_counter() - started
            running = proc.poll() is None
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                raise RuntimeError(
                    f"{' '.join(command[1:])} did not exit within {STOP_TIMEOUT} s of SIGTERM"
                ) from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        cpu = children_cpu() - cpu
        log.seek(0)
        if code != 0 or not running:
            raise RuntimeError(f"{' '.join(command[1:])} exited {code}: {log.read().strip()}")
    # Once the consumer is gone, what it held unacknowledged is back in the queue.
    while (status := probe.status())[1] > 0:
        time.sleep(POLL_INTERVAL)
    consumed = count - status[0]
    return consumed / elapsed, cpu / consumed


# The benchmark ---------------------------------------------------------------


def vhost_url(url: str, vhost: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(vhost, safe="")))


def benchmark(url: str, rounds: int, count: int) -> int:
    me = [sys.executable, str(Path(__file__).relative_to(ROOT))]
    sides = {
        "producer": {
            "baseline": [*me, "_baseline-producer", str(count)],
            "ours": [sys.executable, "pc/producer.py", "--count", str(count), TEXT],
        },
        "consumer": {
            "baseline": [*me, "_baseline-consumer"],
            "ours": [sys.executable, "pc/consumer.py", "--quiet"],
        },
    }
    timers = {"producer": time_producer, "consumer": time_consumer}
    comparisons = {
        "producer": Comparison(f"producer: {count:,} persistent, confirmed", GOAL),
        "consumer": Comparison(f"consumer: drain {count:,}", GOAL),
    }

    print(f"pc throughput: {rounds} rounds of {count:,} messages; {versions()}", flush=True)
    print(f"load average before: {load_average()}", flush=True)
    vhost = f"bench-{uuid.uuid4().hex[:12]}"
    user = urllib.parse.urlsplit(url).username or "guest"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        probe = Probe(vhost_url(url, vhost))
        try:
            for number in range(rounds):
                # Alternate who goes first, so that drift favours neither.
                order = ["baseline", "ours"] if number % 2 == 0 else ["ours", "baseline"]
                line = []
                for question, commands in sides.items():
                    for side in order:
                        rate, cpu = timers[question](probe, commands[side], count)
                        comparisons[question].add(side, rate, cpu)
                        line.append(f"{question} {side} {rate:,.0f}")
                print(f"round {number + 1}: " + ", ".join(line) + " msg/s", flush=True)
        finally:
            probe.close()
    finally:
        rabbitmqctl("delete_vhost", vhost)
    print(f"load average after: {load_average()}")
    print()
    print(table(list(comparisons.values())))
    return 0


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per side (default 5)")
    parser.add_argument(
        "--messages", type=int, default=20000, metavar="N", help="messages per run (default 20000)"
    )
    subcommands = parser.add_subparsers(dest="command", help=argparse.SUPPRESS)
    producer = subcommands.add_parser("_baseline-producer")
    producer.add_argument("count", type=int)
    subcommands.add_parser("_baseline-consumer")
    args = parser.parse_args()
    if args.rounds < 1 or args.messages < 1:
        parser.error("--rounds and --messages must be at least 1")

    logging.basicConfig(level=logging.WARNING)
    # pika logs expected disconnections as errors, with tracebacks.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    url = os.environ.get("AMQP_URL") or DEFAULT_URL
    try:
        if args.command == "_baseline-producer":
            publish_fast(url, args.count)
        elif args.command == "_baseline-consumer":
            FastConsumer(url).run()
        else:
            # SIGTERM unwinds like Ctrl-C, so that the processes and the virtual host go too.
            signal.signal(signal.SIGTERM, _interrupt)
            return benchmark(url, args.rounds, args.messages)
    except KeyboardInterrupt:
        print("pc_throughput: interrupted; stopped everything it started", file=sys.stderr)
    except (RuntimeError, OSError, subprocess.TimeoutExpired, pika.exceptions.AMQPError) as exc:
        print(f"pc_throughput: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
