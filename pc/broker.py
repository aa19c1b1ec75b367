"""Where the broker is, and what to say when it cannot be reached.

Used by pc/producer.py and pc/consumer.py. The broker's address comes from
``AMQP_URL`` (``amqp://`` or ``amqps://``, query parameters such as
``?heartbeat=30`` honoured) and defaults to a local RabbitMQ with the guest
account. Error messages name the broker but never its password.

Each example folder carries its own copy of these few lines so that it can be
copied out of the repository on its own.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import sys
import urllib.parse

import pika
import pika.exceptions
from pika.adapters.utils import connection_workflow

DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"
START_HINT = (
    "start one with 'rabbitmq-server -detached' or 'docker run -d --name some-rabbit -p 5672:5672 rabbitmq:3'"
)


class BrokerError(Exception):
    """The broker is unreachable, refused us, or its URL is invalid; safe to print."""


def broker_url() -> str:
    """Return the broker URL from ``AMQP_URL``, else the local default."""
    return os.environ.get("AMQP_URL") or DEFAULT_URL


def redact(url: str) -> str:
    """Return ``url`` with any password removed, fit for a log line."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparsable URL>"
    user = f"{parts.username}@" if parts.username else ""
    return urllib.parse.urlunsplit((parts.scheme, f"{user}{host}{port}", parts.path, "", ""))


def parameters(url: str) -> pika.URLParameters:
    """Parse ``url`` into connection parameters; raise BrokerError if invalid."""
    if urllib.parse.urlsplit(url).scheme not in ("amqp", "amqps"):
        raise BrokerError(f"invalid broker URL {redact(url)}: it must start with amqp:// or amqps://")
    try:
        return pika.URLParameters(url)
    except (ValueError, TypeError) as exc:
        raise BrokerError(f"invalid broker URL {redact(url)}: {exc}") from exc


def _root_cause(error: BaseException) -> BaseException:
    """Unwrap pika's connection-workflow exceptions down to the one that says why."""
    while True:
        if isinstance(error, connection_workflow.AMQPConnectionWorkflowFailed):
            error = error.exceptions[-1]
        elif isinstance(error, connection_workflow.AMQPConnectorPhaseErrorBase):
            error = error.exception
        elif (
            type(error) is pika.exceptions.AMQPConnectionError
            and error.args
            and isinstance(error.args[-1], BaseException)
        ):
            error = error.args[-1]
        else:
            return error


def explain(url: str, error: BaseException) -> BrokerError:
    """Turn a failure to connect into a one-line BrokerError naming the broker."""
    error = _root_cause(error)
    if isinstance(error, pika.exceptions.ProbableAuthenticationError):
        reason = "login refused: check the user name and password"
    elif isinstance(error, pika.exceptions.ProbableAccessDeniedError):
        reason = "access refused: does the virtual host exist, and may this user use it?"
    elif isinstance(error, socket.gaierror):
        reason = "unknown host"
    elif isinstance(error, ssl.SSLError):
        reason = f"TLS failed: {getattr(error, 'reason', None) or error}"
    elif isinstance(error, ConnectionRefusedError) or "refused" in str(error).lower():
        reason = f"connection refused; is RabbitMQ running? {START_HINT}"
    elif isinstance(error, (TimeoutError, socket.timeout)):
        reason = "timed out"
    else:
        reason = str(error) or type(error).__name__
    return BrokerError(f"cannot connect to {redact(url)}: {reason}")


def connect(url: str) -> pika.BlockingConnection:
    """Open a blocking connection to ``url``; raise BrokerError on failure."""
    params = parameters(url)
    try:
        return pika.BlockingConnection(params)
    except (pika.exceptions.AMQPError, OSError) as exc:
        raise explain(url, exc) from exc


def main() -> int:
    """Check that the broker answers: ``python -m pc.broker``."""
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    url = broker_url()
    try:
        connect(url).close()
    except BrokerError as exc:
        print(f"no broker: {exc}", file=sys.stderr)
        return 1
    print(f"broker answers at {redact(url)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
