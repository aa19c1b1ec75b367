"""Scatter/gather RPC over RabbitMQ: ``DistOp`` on the client, ``OpExecutor`` on the servers.

A client splits a list into one chunk per server and publishes each chunk to the durable work queue.
Each server takes a chunk, runs the op on it and sends the partial result back to the client's private
reply queue, named in the chunk's ``reply_to``; the ``correlation_id`` (job id and the chunk's start
index) tells the client where the partial belongs. When every partial is in, ``get_result()`` hands
them, in order, to ``gather()``. The lesson, line by line: docs/distop.md.

Read distop/call_one.py and distop/serve_one.py first: the same RPC at its simplest, one chunk sent and
answered. Then this library, in four parts, in this order:

- distop/protocol.py: what both sides agree on: the queues, their arguments, the messages, split();
- distop/dist_op.py: the client, DistOp (its thread, reconnection and bookkeeping: client_plumbing.py);
- distop/op_executor.py: the server, OpExecutor;
- distop/pipelined.py: PipelinedOpExecutor, the server that takes a chunk ahead while ops are short.

This module gathers their public names, so that ``from distop.ops import DistOp, OpExecutor`` is all
a program needs:

    class FooOp(DistOp):
        OP_NAME = "foo"

        def gather(self, partials):
            return [x for part in partials.values() for x in part]

    class FooExecutor(OpExecutor):
        def foo(self, chunk):
            return chunk
"""

from distop.dist_op import DistOp
from distop.errors import BrokerError, DistOpError, PoisonChunkError, RemoteError
from distop.op_executor import OpExecutor, UnknownOpError
from distop.pipelined import PipelinedOpExecutor
from distop.protocol import (
    CLIENT_HEADER,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    DEAD_LETTER_QUEUE_ARGUMENTS,
    DELIVERY_LIMIT,
    REPLY_QUEUE_PREFIX,
    WORK_QUEUE,
    WORK_QUEUE_ARGUMENTS,
    split,
)

__all__ = [
    "CLIENT_HEADER",
    "DEAD_LETTER_EXCHANGE",
    "DEAD_LETTER_QUEUE",
    "DEAD_LETTER_QUEUE_ARGUMENTS",
    "DELIVERY_LIMIT",
    "REPLY_QUEUE_PREFIX",
    "WORK_QUEUE",
    "WORK_QUEUE_ARGUMENTS",
    "BrokerError",
    "DistOp",
    "DistOpError",
    "OpExecutor",
    "PipelinedOpExecutor",
    "PoisonChunkError",
    "RemoteError",
    "UnknownOpError",
    "split",
]
