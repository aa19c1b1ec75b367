"""What distop's clients and servers agree on: the queues, the messages, and how a job is cut into chunks.

Read this first; then distop/dist_op.py (the client, DistOp) and distop/op_executor.py (the servers,
OpExecutor). Nothing here connects to anything.

The queues and exchanges, declared alike by both sides (declaring is idempotent):

- WORK_QUEUE, "distop.chunks": the durable work queue that every server consumes from. A quorum queue
  with a delivery limit: a chunk that goes back to the queue more than DELIVERY_LIMIT times (every
  server that took it died) is dead-lettered to DEAD_LETTER_EXCHANGE instead of delivered again.
- DEAD_LETTER_EXCHANGE, "distop.dead": a headers exchange. Each chunk carries its client's id in the
  header CLIENT_HEADER, and each client binds its reply queue to this exchange on that header: a dead
  chunk goes back to the client that sent it. The queue DEAD_LETTER_QUEUE, bound with no header,
  keeps a copy of every dead letter for inspection.
- Each client's reply queue: exclusive and named by the broker ("amq.gen-..."), deleted with the
  client's connection.

The messages, all JSON (nothing received is unpickled or evaluated):

- a chunk, client -> WORK_QUEUE: body {"op": NAME, "chunk": [...], "params": {...}}; properties
  reply_to = the client's reply queue, correlation_id = "JOB_ID:START" (the job, and the index where
  the chunk starts in the job's data), header CLIENT_HEADER = the client's id; persistent.
- a reply, server -> reply_to: body {"result": ...} or {"error": {"type", "message", "host"}};
  correlation_id = the chunk's.
- a dead letter, DEAD_LETTER_EXCHANGE -> reply queue: the chunk itself, with the broker's x-death
  header saying why (x-first-death-reason: delivery_limit, or rejected).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pika.spec import BasicProperties

from distop import codec
from distop.errors import PoisonChunkError, RemoteError, printable

# Names that clients and servers must agree on.
WORK_QUEUE = "distop.chunks"
# One name for two things: exchange names and queue names are separate namespaces in RabbitMQ.
DEAD_LETTER_EXCHANGE = "distop.dead"
DEAD_LETTER_QUEUE = "distop.dead"
CLIENT_HEADER = "distop-client"
# Clients' reply queues are named by the broker, so their names start with this.
REPLY_QUEUE_PREFIX = "amq.gen-"
# The delivery limit, counted as in pc/workqueue.py: with a limit of 4, a chunk is delivered at most 5
# times, the first time and once more after each of its first 4 returns unacked (its server died); its 5th
# return dead-letters it. pc allows 5: a pc consumer holds up to 200 messages and a crash sends them all
# back, innocent ones too. A distop server holds one chunk, so each return is a server lost while running
# that very chunk, and a poison chunk should cost few servers. A chunk given back unstarted
# (distop/pipelined.py, at most once per chunk) counts as one return.
DELIVERY_LIMIT = 4  # Our choice: 5 deliveries at most
# The work queue is a quorum queue (replicated on a cluster; it counts how often each chunk comes back),
# and sends the chunks it gives up on, past the delivery limit or rejected, to the dead-letter exchange.
WORK_QUEUE_ARGUMENTS = {
    "x-queue-type": "quorum",
    "x-delivery-limit": DELIVERY_LIMIT,
    "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
}
# The dead-letter queue keeps rejected and poison chunks for inspection, bounded. A quorum queue too, so
# that on a cluster it lives on every node: a classic queue (the default type) lives on one node, and
# servers that lose that node would be refused their declarations.
# Our choice: bounded to 10,000; when full, the oldest dead letter makes room for the new one.
DEAD_LETTER_QUEUE_ARGUMENTS = {"x-queue-type": "quorum", "x-max-length": 10_000}
JSON = "application/json"
# A correlation id as clients make them: the job id (uuid4 hex) and a start index, written as str() writes
# it (no sign, no leading zero): "JOB:02" is no client's, so it answers nothing.
CORRELATION_ID = re.compile(r"([0-9a-f]{32}):(0|[1-9][0-9]{0,17})", re.ASCII)
# After losing the broker, keep trying this long before giving up.
RECONNECT_FOR = 60.0
MAX_BACKOFF = 5.0


def split(data: list[Any], group_size: int) -> list[tuple[int, list[Any]]]:
    """Split ``data`` into ``min(group_size, len(data))`` contiguous chunks.

    Returns ``(start_index, chunk)`` pairs; chunk sizes differ by at most one.
    """
    count = min(group_size, len(data))
    size, extra = divmod(len(data), count)
    chunks, start = [], 0
    for i in range(count):
        end = start + size + (1 if i < extra else 0)
        chunks.append((start, data[start:end]))
        start = end
    return chunks


def parse_request(props: BasicProperties, body: bytes) -> dict[str, Any]:
    """Return the chunk request in ``body``; raise ValueError saying what is wrong."""
    if not props.reply_to:
        raise ValueError("no reply_to")
    if not isinstance(props.reply_to, str):  # pika leaves a property that is not UTF-8 as bytes
        raise ValueError(f"reply_to {props.reply_to[:80]!r} is not UTF-8")
    if not props.reply_to.startswith(REPLY_QUEUE_PREFIX) or props.reply_to == REPLY_QUEUE_PREFIX:
        # Only a queue the broker named for a client: a chunk must not make us
        # publish into someone else's queue. Names that start with "amq." are
        # reserved: no client may declare one, so an amq.gen- queue is always a
        # broker-named, exclusive reply queue. Whose, we cannot tell: a chunk may
        # still name another client's reply queue, which drops a reply it did not ask for.
        raise ValueError(
            f"reply_to {props.reply_to[:80]!r} is not a client's reply queue ({REPLY_QUEUE_PREFIX}...)"
        )
    if not props.correlation_id:
        raise ValueError("no correlation_id")
    request = codec.loads(body)  # ValueError (or UnicodeDecodeError, a ValueError) if not JSON
    if not isinstance(request, dict):
        raise ValueError("not a JSON object")
    if not isinstance(request.get("op"), str):
        raise ValueError('"op" is not a string')
    if not isinstance(request.get("chunk"), list):
        raise ValueError('"chunk" is not a list')
    if not isinstance(request.get("params", {}), dict):
        raise ValueError('"params" is not an object')
    request.setdefault("params", {})
    return request


@dataclass
class Partial:
    result: Any


def decode_reply(body: bytes) -> Partial | RemoteError:
    """A server's reply: the partial result, or the error its op raised. ValueError if malformed."""
    reply = codec.loads(body)
    if not isinstance(reply, dict):
        raise ValueError("not a JSON object")
    if "error" in reply:
        error = reply["error"]
        fields = ("type", "message", "host")
        if not isinstance(error, dict) or not all(isinstance(error.get(f), str) for f in fields):
            raise ValueError('"error" is not an object of strings type, message and host')
        return RemoteError(error["type"], error["message"], error["host"])
    if "result" not in reply:
        raise ValueError('neither "result" nor "error"')
    return Partial(reply["result"])


def dead_letter_error(job_id: str, start: int, headers: dict[str, Any]) -> PoisonChunkError:
    reason = headers.get("x-first-death-reason", "dead-lettered")
    if isinstance(reason, bytes):
        reason = reason.decode(errors="replace")
    if reason == "delivery_limit":
        return PoisonChunkError(
            f"job {job_id}: the chunk at index {start} was delivered {DELIVERY_LIMIT + 1} times and "
            "never finished; it probably crashes the servers that take it"
        )
    if reason == "rejected":
        return PoisonChunkError(f"job {job_id}: a server rejected the chunk at index {start} as malformed")
    return PoisonChunkError(
        f"job {job_id}: the chunk at index {start} was dead-lettered ({printable(str(reason)[:80])})"
    )


def error_text(exc: BaseException) -> str:
    """``str(exc)``, even for an exception whose ``__str__`` raises, in text that UTF-8 can carry."""
    try:
        text = str(exc)
    except Exception:
        return f"<{type(exc).__name__} whose message cannot be shown>"
    # Half a UTF-16 pair ("\udcff": bytes decoded with errors="surrogateescape") has no UTF-8 form, so a reply
    # holding it could not be read: it is written as its escape instead.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def refused(reason: BaseException) -> str:
    """Say why the broker refused our declarations, and what to do when a queue was declared otherwise."""
    found = re.search(r"inequivalent arg .* for queue '([^']+)'", str(reason))
    if not found:
        return f"the broker refused our queues: {reason}"
    queue = found[1]
    return (
        f"the broker refused our queues: queue {queue!r} exists with other arguments, perhaps from an older "
        f"distop: delete it with 'rabbitmqctl delete_queue {queue}' (its messages go with it); {reason}"
    )
