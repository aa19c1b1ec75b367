"""Where the broker is, and what to say when it cannot be reached (the same file in every folder).

The address is a host argument (``rabbit``, ``rabbit:5673``, ``[::1]``: guest account) or an
``amqp://`` / ``amqps://`` URL; without one, ``AMQP_URL``; then a local RabbitMQ. A cluster's
nodes are comma-separated: ``rabbit1,rabbit2:5673``, or ``amqp://u:p@h1/%2F,h2:5673`` where a
bare ``host[:port]`` takes the first URL's scheme, credentials, virtual host and query (a comma in a
virtual host's name is written %2C). Spaces around the whole are ignored; an empty address is refused.
Errors name every address tried, never a password. Importing this module also mends, for the whole
program, a pika 1.4 decoder that raised on some header values (a timestamp past the year 9999, tables nested
hundreds deep): _decode_what_pika_cannot.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import ssl
import struct
import sys
import threading
import urllib.parse

import pika
import pika.data
from pika import exceptions as amqp
from pika.adapters.utils import connection_workflow as workflow

DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"
START_HINT = (
    "start one with 'rabbitmq-server -detached' or 'docker run -d --name some-rabbit -p 5672:5672 rabbitmq:3'"
)
HOST = r"(?:[\w.-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?"  # host, host:port, [ipv6] or [ipv6]:port
# A comma that starts the next address (or an empty one, refused): not one in ssl_options, nor in a
# password (an "@" follows it before any "/").
NEXT_ADDRESS = re.compile(rf",(?=amqps?://|(?:{HOST})?(?:,|$))(?![^/]*@)")
BROKER_SAID = re.compile(r"\(530\) [\"'](.+)[\"']")  # "(530) 'NOT_ALLOWED - vhost v not found'"
REASONS = [  # why a connection failed: the first that matches
    (amqp.ProbableAuthenticationError, "login refused: check the user name and password"),
    (amqp.ProbableAccessDeniedError, "access refused: does the virtual host exist, may this user use it?"),
    (socket.gaierror, "unknown host"),
    (ConnectionRefusedError, "connection refused"),
    (TimeoutError, "timed out"),  # socket.timeout too, since Python 3.10
]

try:  # distop's errors all derive from its DistOpError; the other folders need only this one
    from .errors import BrokerError
except ImportError:

    class BrokerError(Exception):  # type: ignore[no-redef]
        """The broker is unreachable, refused us, or its address is invalid; safe to print."""


MAX_DEPTH = 32  # tables and arrays in a header, nested deeper than this, are decoded as None


def _decode_what_pika_cannot() -> None:
    """pika 1.4: decode two kinds of header value that pika's decoder raises on, keeping the connection.

    Any publisher may write them, and pika's decoder raises on them: pika then drops the whole connection,
    every unacked message goes back to the queue with the bad one, and comes back again, until the delivery
    limit dead-letters them all. A timestamp past the year 9999 is decoded as its number of seconds; a table
    or array nested deeper than MAX_DEPTH as None (pika's decoder recurses: some 400 levels exhaust Python's
    stack). The message is then handled like any other.
    """
    decode = pika.data.decode_value
    nesting = threading.local()  # how deep the value being decoded is, on this thread

    def decode_value(encoded: bytes, offset: int) -> tuple[object, int]:
        kind = encoded[offset : offset + 1]  # offset is at the value's type letter
        if kind in (b"F", b"A"):  # a table or an array: its size in bytes follows
            depth = getattr(nesting, "depth", 0)
            if depth >= MAX_DEPTH:
                return None, offset + 5 + struct.unpack_from(">I", encoded, offset + 1)[0]
            nesting.depth = depth + 1
            try:
                return decode(encoded, offset)
            finally:
                nesting.depth = depth
        try:
            return decode(encoded, offset)
        except (OverflowError, OSError, ValueError):  # datetime cannot hold it
            if kind != b"T":
                raise
            return struct.unpack_from(">Q", encoded, offset + 1)[0], offset + 9

    pika.data.decode_value = decode_value  # pika's tables call it by this name, nested ones too


_decode_what_pika_cannot()


def resolve(rabbit_host: str | None = None) -> str:
    """Return the URL(s) for ``rabbit_host``, else ``AMQP_URL``, else localhost; BrokerError if invalid."""
    rabbit_host = (rabbit_host or "").strip()  # a space or newline pasted with it
    if not rabbit_host:
        return os.environ.get("AMQP_URL", "").strip() or DEFAULT_URL
    first, comma, others = rabbit_host.partition(",")
    if "://" in first:
        return rabbit_host
    hosts = first if "://" in others else rabbit_host  # host names, then maybe URLs
    if not re.fullmatch(rf"{HOST}(,{HOST})*", hosts):  # it may hold a password: do not echo it
        raise BrokerError("invalid broker host: give host names, host:port, or amqp:// URLs")
    return f"amqp://guest:guest@{first}/%2F{comma}{others}"  # the hosts after it take the same account


def _split(address: str) -> tuple[str, str, str, str]:
    """Scheme, user info, host[:port], the rest; the last "@" ends the user info (a password may hold "/")."""
    scheme, _, tail = address.partition("://") if "://" in address else ("", "", address)
    userinfo, _, location = tail.rpartition("@")
    host = re.match(r"[^/?#]*", location)[0]  # type: ignore[index]
    return scheme, userinfo, host, location[len(host) :]


def addresses(url: str) -> list[str]:
    """Split ``url`` into one URL per node, completing each bare ``host[:port]`` from the first."""
    first, *others = NEXT_ADDRESS.split(url)
    if "" in (first, *others):  # "h1,,h2": else "h1"'s virtual host would take the comma
        raise BrokerError("invalid broker URL: an address between commas is empty")
    scheme, userinfo, _, rest = _split(first)
    at = "@" if userinfo else ""
    return [first] + [node if "://" in node else f"{scheme}://{userinfo}{at}{node}{rest}" for node in others]


def redact(url: str) -> str:
    """Return the addresses of ``url`` without password or query, fit for a log line."""
    names = []
    for scheme, userinfo, host, rest in map(_split, addresses(url)):
        user = f"{userinfo.partition(':')[0]}@" if userinfo else ""
        names.append(f"{scheme}://{user}{host}{re.split('[?#]', rest)[0]}")
    return ", ".join(names)


def parameters(url: str, blocked_for: float | None = None) -> list[pika.URLParameters]:
    """Parse ``url`` into pika's connection parameters, one per node; raise BrokerError if invalid.

    ``blocked_for``: for a publisher, pika's ``blocked_connection_timeout`` where the URL sets none; pika
    then drops a connection the broker blocks (memory or disk alarm) for longer than that many seconds,
    with ConnectionBlockedTimeout. Not for consumers nor servers: they are not blocked, and drain the
    queues meanwhile; a server that dropped its connection would send back the chunk it holds.
    """
    result = []
    for address in addresses(url):
        invalid = f"invalid broker URL {redact(address)}"
        try:
            parts = urllib.parse.urlsplit(address)
        except ValueError as exc:  # "Invalid IPv6 URL": a "[" or "]" outside an IPv6 address
            raise BrokerError(f"{invalid}: {exc}; write '[' and ']' in a password as %5B and %5D") from exc
        if parts.scheme not in ("amqp", "amqps"):
            raise BrokerError(f"{invalid}: it must start with amqp:// or amqps://")
        _, userinfo, host, _ = _split(address)
        if parts.netloc != f"{userinfo}@{host}".lstrip("@"):  # a password with "/", "?" or "#" in it
            raise BrokerError(f"{invalid}: write '/', '?', '#', '@' in a password as %2F, %3F, %23, %40")
        try:
            result.append(pika.URLParameters(address))
            if result[-1].blocked_connection_timeout is None:
                result[-1].blocked_connection_timeout = blocked_for
        except (ValueError, TypeError, SyntaxError, OSError) as exc:  # port, query or ssl_options
            detail = str(exc).splitlines()[0]
            if "ssl_options" in parts.query and ("malformed" in detail or isinstance(exc, SyntaxError)):
                detail = "ssl_options must be a Python dict, such as {'ca_certs': 'ca.pem'}"
            raise BrokerError(f"{invalid}: {detail}") from exc
    return result


def _reason(error: BaseException) -> str:
    """Say in a few words why a connection failed, from the innermost of pika's exceptions."""
    while True:  # unwrap pika's connection-workflow exceptions
        if isinstance(error, workflow.AMQPConnectionWorkflowFailed):
            error = error.exceptions[-1]
        elif isinstance(error, workflow.AMQPConnectorPhaseErrorBase):
            error = error.exception
        elif type(error) is amqp.AMQPConnectionError and isinstance((error.args or [0])[-1], BaseException):
            error = error.args[-1]
        else:
            break
    if isinstance(error, ssl.SSLError):
        return f"TLS failed: {getattr(error, 'reason', None) or error}"
    # The broker's own words, when it closed the connection as it opened: a virtual host that does not
    # exist, a user it refuses, a connection limit reached.
    if isinstance(error, amqp.ProbableAccessDeniedError) and (said := BROKER_SAID.search(str(error))):
        return f"access refused: {said[1]}"
    reasons = [reason for kind, reason in REASONS if isinstance(error, kind)]
    if not reasons and "refused" in str(error).lower():
        reasons = ["connection refused"]
    return (reasons or [str(error).partition("\n")[0] or type(error).__name__])[0]


def explain(url: str, *errors: BaseException) -> BrokerError:
    """One line saying why ``url`` could not be reached: one error for all its addresses, or one each."""
    names, reasons = [redact(address) for address in addresses(url)], [_reason(error) for error in errors]
    if len(reasons) == len(names):
        where = "; ".join(f"{name}: {reason}" for name, reason in zip(names, reasons, strict=True))
    else:
        where = f"{', '.join(names)}: {reasons[-1]}"
    hint = f"; is RabbitMQ running? {START_HINT}" if "connection refused" in reasons else ""
    return BrokerError(f"cannot connect to {where}{hint}")


class Connection(pika.BlockingConnection):
    """A BlockingConnection that knows its node, and whose ``with`` block, left by Ctrl-C, ends without the
    close handshake.

    ``node``: the address of AMQP_URL that answered, without its password, for log lines: on a cluster,
    which node we are on.

    The KeyboardInterrupt may have come in the middle of a pika call, and a broker that blocks us (memory
    or disk alarm) reads nothing, so would never answer the close: the process ends, and the broker sees
    the connection go (unacked messages go back to their queue, as after a close).
    """

    node = ""

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not KeyboardInterrupt:
            super().__exit__(exc_type, *exc)


def connect(url: str, blocked_for: float | None = None) -> Connection:
    """Connect to the first address of ``url`` that answers; raise BrokerError naming each if none does.

    Blocks for at most the URL's ``socket_timeout`` (pika's default: 10 s) per IP address tried.
    ``blocked_for``: as in parameters(), for a publisher.
    """
    errors: list[BaseException] = []
    for address, params in zip(addresses(url), parameters(url, blocked_for), strict=True):
        try:
            connection = Connection(params)
        except (amqp.AMQPError, OSError) as exc:
            errors.append(exc)
            continue
        connection.node = redact(address)
        return connection
    raise explain(url, *errors) from errors[-1]


def close_quietly(connection: pika.BlockingConnection | None) -> None:
    """Close ``connection`` if it is open, ignoring a broker that is already gone."""
    try:
        if connection is not None and connection.is_open:
            connection.close()
    except (amqp.AMQPError, OSError):
        pass


def main() -> int:
    """Say whether the broker answers (``python -m PACKAGE.broker [RABBIT_HOST]``); exit status 1 if not."""
    parser = argparse.ArgumentParser(prog=f"python -m {__package__}.broker", description="Check the broker.")
    parser.add_argument("rabbit_host", nargs="?", help="host names or amqp:// URLs (default: AMQP_URL)")
    rabbit_host = parser.parse_args().rabbit_host
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    try:
        url = resolve(rabbit_host)
        close_quietly(connect(url))
    except BrokerError as exc:
        print(f"no broker: {exc}", file=sys.stderr)
        return 1
    print(f"broker answers at {redact(url)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
