"""Where the broker is, and what to say when it cannot be reached.

Used by distop.ops on both sides. ``rabbit_host`` may be a host name
(``rabbit`` or ``rabbit:5673``, guest account) or a full ``amqp://`` /
``amqps://`` URL; without it, ``AMQP_URL``, then a local RabbitMQ. Messages
name the broker but never its password.
"""

from __future__ import annotations

import os
import socket
import ssl
import urllib.parse

import pika
import pika.exceptions
from pika.adapters.utils import connection_workflow

from distop.errors import BrokerError

DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"
START_HINT = (
    "start one with 'rabbitmq-server -detached' or 'docker run -d --name some-rabbit -p 5672:5672 rabbitmq:3'"
)


def resolve(rabbit_host: str | None = None) -> str:
    """Return the broker URL for ``rabbit_host``, else ``AMQP_URL``, else localhost."""
    if not rabbit_host:
        return os.environ.get("AMQP_URL") or DEFAULT_URL
    if "://" in rabbit_host:
        return rabbit_host
    host, _, port = rabbit_host.partition(":")
    return f"amqp://guest:guest@{host}:{port or 5672}/%2F"


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
    elif isinstance(error, TimeoutError):
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
