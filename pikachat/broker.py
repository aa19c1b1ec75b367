"""Where the broker is, and what to say when it cannot be reached.

Used by every pikachat script. ``RABBIT_HOST`` (the scripts' first argument)
is a host name (``rabbit``, ``rabbit:5673``, ``[::1]``: guest account, default
virtual host) or a full ``amqp://`` / ``amqps://`` URL; without it, the
``AMQP_URL`` environment variable, then a local RabbitMQ. Error messages name
the broker but never its password.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import urllib.parse

import pika
import pika.exceptions
from pika.adapters.utils import connection_workflow

DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"
START_HINT = (
    "start one with 'rabbitmq-server -detached' or 'docker run -d --name some-rabbit -p 5672:5672 rabbitmq:3'"
)
# host, host:port, [ipv6] or [ipv6]:port
HOST = re.compile(r"(?:[\w.-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?")


class BrokerError(Exception):
    """The broker is unreachable, refused us, or its address is invalid; safe to print."""


def resolve(rabbit_host: str | None = None) -> str:
    """Return the broker URL for ``rabbit_host``, else ``AMQP_URL``, else localhost.

    Raises BrokerError if ``rabbit_host`` is neither a URL nor a host name.
    """
    if not rabbit_host:
        return os.environ.get("AMQP_URL") or DEFAULT_URL
    if "://" in rabbit_host:
        return rabbit_host
    if not HOST.fullmatch(rabbit_host):
        # It may hold a password ("alice:secret@rabbit"): do not echo it.
        raise BrokerError("invalid broker host: give a host name, host:port, or an amqp:// URL")
    return f"amqp://guest:guest@{rabbit_host}/%2F"


def redact(url: str) -> str:
    """Return ``url`` with any password removed, fit for a log line."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
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
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return BrokerError(f"cannot connect to {redact(url)}: {reason}")


def connect(url: str) -> pika.BlockingConnection:
    """Open a blocking connection to ``url``; raise BrokerError on failure.

    Blocks for at most the URL's ``socket_timeout`` (pika's default: 10 s)
    per address the host name resolves to.
    """
    params = parameters(url)
    try:
        return pika.BlockingConnection(params)
    except (pika.exceptions.AMQPError, OSError) as exc:
        raise explain(url, exc) from exc


def close_quietly(connection: pika.BlockingConnection | None) -> None:
    """Close ``connection`` if it is open, ignoring a broker that is already gone."""
    try:
        if connection is not None and connection.is_open:
            connection.close()
    except (pika.exceptions.AMQPError, OSError):
        pass
