"""The Celery side of bench/distop_vs_pool.py: the same plus_one work as a Celery task.

The benchmark starts the worker itself, on its own virtual host:

    AMQP_URL=amqp://guest:guest@localhost:5672/VHOST \\
        celery -A bench._celery_tasks worker --concurrency 2 --pool prefork

Results go back through the ``rpc://`` backend: a reply queue per client, as
distop does.
"""

from __future__ import annotations

import os

from celery import Celery

from bench._distop_server import plus_one

DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"

app = Celery("bench", broker=os.environ.get("AMQP_URL") or DEFAULT_URL, backend="rpc://")
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="bench.plus_one")
def plus_one_task(chunk: list[int]) -> list[int]:
    return plus_one(chunk)
