"""The simplest correct publish: one message to the queue ``pc``, confirmed. pc/producer.py: many at once.

    python pc/send_one.py [TEXT ...]     # the message; without one, "Hello World!"

Read it with pc/consume_one.py, which takes the message off the queue.
"""

import sys

import pika

from pc.broker import BrokerError, connect, resolve
from pc.workqueue import DEAD_LETTER_QUEUE, DEAD_LETTER_QUEUE_ARGUMENTS, QUEUE, QUEUE_ARGUMENTS

PERSISTENT = pika.BasicProperties(content_type="text/plain", delivery_mode=pika.DeliveryMode.Persistent)


def main() -> int:
    if sys.argv[1:2] in (["-h"], ["--help"]):  # asking how to use it, not a message to send
        print(__doc__)
        return 0
    text = " ".join(sys.argv[1:]) or "Hello World!"
    try:
        body = text.encode()
    except UnicodeEncodeError:  # the shell passed bytes that are not UTF-8
        print("send_one: the message text is not UTF-8", file=sys.stderr)
        return 2
    try:
        # connect(), in broker.py: pika.BlockingConnection(pika.URLParameters(url)), first node up.
        # blocked_for: a broker short of memory or disk stops reading from publishers; give up after 60 s.
        with connect(resolve(), blocked_for=60) as connection:  # BlockingConnection: calls wait for answers
            channel = connection.channel()
            channel.confirm_delivery()  # basic_publish now returns once the broker has the message safe
            # Where pc puts a message that has failed too often; declared first, so it is there.
            channel.queue_declare(DEAD_LETTER_QUEUE, durable=True, arguments=DEAD_LETTER_QUEUE_ARGUMENTS)
            channel.queue_declare(QUEUE, durable=True, arguments=QUEUE_ARGUMENTS)  # as pc/consumer.py does
            # Persistent: on disk. mandatory: if no queue takes it, UnroutableError, not a silent drop.
            channel.basic_publish("", QUEUE, body, PERSISTENT, mandatory=True)
    except (BrokerError, pika.exceptions.AMQPError) as exc:
        if isinstance(exc, pika.exceptions.ConnectionBlockedTimeout):  # blocked_for (or the URL's) ran out
            exc = "the broker blocked the connection (memory or disk alarm); gave up"
        elif isinstance(exc, pika.exceptions.NackError):  # basic.nack: a full queue, a cluster in trouble
            exc = "the broker refused the message (a nack)"
        print(f"send_one: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the confirm: the message may or may not be in the queue
        print("send_one: interrupted", file=sys.stderr)
        return 1
    print(f"sent {text!r} to {QUEUE!r} (confirmed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
