"""The simplest correct consumer: shows each message of the queue ``pc``, then acks it. Ctrl-C stops it.

pc/consumer.py adds reconnection, batched acks, a handler that fails, and the broker cancelling it.
"""

import sys

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

from pc.broker import BrokerError, connect, resolve
from pc.workqueue import DEAD_LETTER_QUEUE, DEAD_LETTER_QUEUE_ARGUMENTS, QUEUE, QUEUE_ARGUMENTS


def main() -> int:
    try:
        # connect(), in broker.py: pika.BlockingConnection(pika.URLParameters(url)), first node up.
        connection = connect(resolve())  # BlockingConnection: each call waits for its answer
        channel = connection.channel()
        # Where pc puts a message that has failed too often; declared first, so it is there.
        channel.queue_declare(DEAD_LETTER_QUEUE, durable=True, arguments=DEAD_LETTER_QUEUE_ARGUMENTS)
        channel.queue_declare(QUEUE, durable=True, arguments=QUEUE_ARGUMENTS)  # as pc/send_one.py does
        # Prefetch: at most 10 unacked messages pushed to us; the rest wait for any free consumer.
        channel.basic_qos(prefetch_count=10)
        channel.basic_consume(QUEUE, on_message)  # manual acks (auto_ack=False): see on_message
        print(f"waiting for messages on {QUEUE!r}; Ctrl-C to stop")
        channel.start_consuming()  # calls on_message for each; returns if the broker cancels us
    except KeyboardInterrupt:
        # Ctrl-C can land in the middle of a pika call, so we exit without closing (a close could wait
        # for an answer pika has lost). The broker sees the connection go and requeues every unacked message.
        return 0
    except (BrokerError, pika.exceptions.AMQPError) as exc:
        print(f"consume_one: {exc}", file=sys.stderr)
        return 1
    connection.close()
    print(f"consume_one: the broker cancelled the consumer (queue {QUEUE!r} deleted?)", file=sys.stderr)
    return 1


def on_message(channel: BlockingChannel, method: Basic.Deliver, _props: BasicProperties, body: bytes) -> None:
    # repr: control characters escaped; errors="replace": bytes that are not UTF-8 show as U+FFFD.
    print(f"received {body.decode(errors='replace')!r}")
    # Ack after handling, never before: until then the message is the broker's, and goes
    # back to the queue (for the next consumer) if we die or close without acking it.
    channel.basic_ack(delivery_tag=method.delivery_tag)


if __name__ == "__main__":
    sys.exit(main())
