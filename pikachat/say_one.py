"""The simplest chat line: one message to everyone listening, confirmed. pikachat/send.py: each line typed.

    python pikachat/say_one.py [TEXT...]     # without TEXT: "Hello everyone!"

The broker: AMQP_URL, else a local RabbitMQ (amqp://guest:guest@localhost:5672/%2F).
"""

import sys
import time
import uuid

import pika

from pikachat.broker import BrokerError, connect, resolve
from pikachat.message import EXCHANGE, MAX_TEXT, Message, encode

# Transient: every queue bound to the exchange is a listener's temporary queue; disk would keep nothing.
TRANSIENT = pika.BasicProperties(content_type="application/json", delivery_mode=pika.DeliveryMode.Transient)


def main() -> int:
    if sys.argv[1:2] in (["-h"], ["--help"]):  # asking how to use it, not saying "--help"
        print(__doc__)
        return 0
    text = " ".join(sys.argv[1:])[:MAX_TEXT] or "Hello everyone!"  # longer: receivers would cut it
    try:
        body = encode(Message("say", "say_one", uuid.uuid4().hex, text, time.time()))  # what receive.py reads
    except UnicodeEncodeError:  # the shell passed bytes that are not UTF-8
        print("say_one: the message text is not UTF-8", file=sys.stderr)
        return 2
    try:
        # connect(), in broker.py: pika.BlockingConnection(pika.URLParameters(url)), first node up.
        # blocked_for: a broker short of memory or disk stops reading from publishers; give up after 60 s.
        with connect(resolve(), blocked_for=60) as connection:  # BlockingConnection: calls wait for answers
            channel = connection.channel()
            channel.confirm_delivery()  # basic_publish now returns once the broker has taken the message
            # fanout: copies each message into every queue bound to it; declared as receive.py declares it.
            channel.exchange_declare(EXCHANGE, exchange_type="fanout", durable=True)
            # No routing key: fanout ignores it. mandatory: if no queue is bound, UnroutableError.
            channel.basic_publish(EXCHANGE, "", body, TRANSIENT, mandatory=True)
    except pika.exceptions.UnroutableError:  # returned: no queue bound, so nobody is listening
        print(f"nobody is listening: {text!r} reached no one")
        return 0
    except (BrokerError, pika.exceptions.AMQPError) as exc:
        if isinstance(exc, pika.exceptions.ConnectionBlockedTimeout):  # blocked_for (or the URL's) ran out
            exc = "the broker blocked the connection (memory or disk alarm); gave up"
        elif isinstance(exc, pika.exceptions.NackError):  # basic.nack: a full queue, a cluster in trouble
            exc = "the broker refused the line (a nack)"
        print(f"say_one: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the confirm: the line may or may not have gone out
        print("say_one: interrupted", file=sys.stderr)
        return 1
    print(f"said {text!r} to everyone listening (confirmed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
