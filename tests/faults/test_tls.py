"""TLS: every example talks to a broker over amqps:// and verifies its certificate.

A private node listens for TLS with a certificate from a CA made here with
trustme. The scripts trust that CA through SSL_CERT_FILE (pika builds its
TLS context with ssl.create_default_context(), which reads it), and must
refuse the broker when they do not trust it, or when its certificate names
another host.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from tests.conftest import (
    BrokerNode,
    Spawn,
    make_vhost,
    node_port,
    rabbitmqctl,
    run_to_end,
    wait_until,
)
from tests.faults.conftest import Report


@dataclass
class TLSBroker:
    node: BrokerNode
    port: int
    ca: Path  # the CA that signed the broker's certificate
    other_ca: Path  # a CA that did not

    def url(self, vhost: str, host: str = "127.0.0.1") -> str:
        return f"amqps://guest:guest@{host}:{self.port}/{vhost}"

    def tls_connections(self, vhost: str) -> list[str]:
        out = rabbitmqctl("list_connections", "-q", "--no-table-headers", "vhost", "ssl", node=self.node)
        return [ssl for v, ssl in (line.split("\t") for line in out.splitlines()) if v == vhost]


@pytest.fixture(scope="module")
def tls_broker() -> Iterator[TLSBroker]:
    with tempfile.TemporaryDirectory(prefix="pyclass-tls-") as tmp:
        base = Path(tmp)
        ca = trustme.CA()
        cert = ca.issue_cert("localhost", "127.0.0.1")
        ca.cert_pem.write_to_path(base / "ca.pem")
        cert.cert_chain_pems[0].write_to_path(base / "cert.pem")
        cert.private_key_pem.write_to_path(base / "key.pem")
        trustme.CA().cert_pem.write_to_path(base / "other-ca.pem")
        port = node_port()
        config = "\n".join(
            [
                f"listeners.ssl.default = {port}",
                f"ssl_options.cacertfile = {base / 'ca.pem'}",
                f"ssl_options.certfile = {base / 'cert.pem'}",
                f"ssl_options.keyfile = {base / 'key.pem'}",
                "ssl_options.verify = verify_none",
                "ssl_options.fail_if_no_peer_cert = false",
                # RabbitMQ drops a TLS handshake not done in 5 s; a busy test machine can take that long,
                # and the client then sees the connection end (EOF) instead of the certificate to refuse.
                "ssl_handshake_timeout = 60000",
                "",
            ]
        )
        node = BrokerNode(base, config)
        node.start()
        try:
            yield TLSBroker(node, port, base / "ca.pem", base / "other-ca.pem")
        finally:
            node.kill()


@pytest.fixture
def tls_vhost(tls_broker: TLSBroker) -> Iterator[str]:
    name = make_vhost(tls_broker.node)
    yield name
    rabbitmqctl("delete_vhost", name, node=tls_broker.node)


def test_pc_over_tls(spawn: Spawn, tls_broker: TLSBroker, tls_vhost: str, report: Report) -> None:
    url, trust = tls_broker.url(tls_vhost), {"SSL_CERT_FILE": str(tls_broker.ca)}
    started = time.monotonic()
    consumer = spawn("pc/consumer.py", url=url, env=trust)
    consumer.wait_for("waiting for messages on 'pc' at amqps://guest@127.0.0.1")
    producer = run_to_end(spawn, "pc/producer.py", "--count", "100", "secret", url=url, env=trust)
    assert producer.popen.returncode == 0, producer.output
    consumer.wait_for("received 'secret 100'")
    # At least the consumer's connection is open; every connection is TLS.
    assert set(tls_broker.tls_connections(tls_vhost)) == {"true"}
    report(
        "tls pc",
        sent=100,
        delivered=consumer.count("received 'secret"),
        duplicates=0,
        lost=0,
        seconds=time.monotonic() - started,
    )


def test_distop_over_tls(spawn: Spawn, tls_broker: TLSBroker, tls_vhost: str, report: Report) -> None:
    url, trust = tls_broker.url(tls_vhost), {"SSL_CERT_FILE": str(tls_broker.ca)}
    started = time.monotonic()
    server = spawn("distop/callee.py", url=url, env=trust)
    server.wait_for("serving")
    client = run_to_end(
        spawn, "distop/client.py", "--op", "pow", "--param", "esp=2", "--size", "9", url=url, env=trust
    )
    assert client.popen.returncode == 0, client.output
    assert client.stdout_lines == [str([x**2 for x in range(9)])]
    assert set(tls_broker.tls_connections(tls_vhost)) == {"true"}
    caller = run_to_end(spawn, "distop/caller.py", url=url, env=trust)
    assert caller.popen.returncode == 0, caller.output
    wait_until(lambda: server.count(r"chunk \S+: pow on") >= 9, 10, "the server's log of 9 chunks")
    chunks = server.count(r"chunk \S+: pow on")
    report(
        "tls distop",
        sent=3 + 6,  # client.py: 3 chunks; caller.py: 2 jobs of 3
        delivered=chunks,
        duplicates=0,
        lost=9 - chunks,
        seconds=time.monotonic() - started,
    )
    assert chunks == 9


def test_pikachat_over_tls(spawn: Spawn, tls_broker: TLSBroker, tls_vhost: str, report: Report) -> None:
    url, trust = tls_broker.url(tls_vhost), {"SSL_CERT_FILE": str(tls_broker.ca)}
    started = time.monotonic()
    receiver = spawn("pikachat/receive.py", url=url, env=trust)
    receiver.wait_for("listening on exchange 'pikachat' at amqps://guest@127.0.0.1")
    misty = spawn("pikachat/chat.py", "--name", "misty", url=url, env=trust, stdin=True)
    misty.wait_for("joined 'pikachat'")
    sender = spawn("pikachat/send.py", "--name", "ash", url=url, env=trust, stdin=True)
    lines = [f"line {i}" for i in range(1, 51)]
    for line in lines:
        sender.send(line)
    sender.close_stdin()
    assert sender.wait() == 0, sender.output
    misty.send("over and out")
    receiver.wait_for("misty: over and out$")
    misty.wait_for("ash: line 50$")
    heard = [line.split(" ", 1)[1] for line in receiver.stdout_lines]
    assert heard == ["* misty joined", *(f"ash: {line}" for line in lines), "misty: over and out"]
    assert set(tls_broker.tls_connections(tls_vhost)) == {"true"}
    report(
        "tls pikachat",
        sent=len(lines) + 1,
        delivered=len(heard) - 1,
        duplicates=0,
        lost=0,
        seconds=time.monotonic() - started,
    )


# Every script that connects, with the arguments that make it connect at once.
SCRIPTS = [
    ("pc/producer.py",),
    ("pc/consumer.py",),
    ("distop/callee.py",),
    ("distop/client.py", "--timeout", "5"),
    ("distop/caller.py",),
    ("pikachat/receive.py",),
    ("pikachat/send.py",),
    ("pikachat/chat.py",),
]


@pytest.mark.parametrize("trust", ["system CAs", "another CA", "wrong host name"])
@pytest.mark.parametrize("command", SCRIPTS, ids=lambda c: c[0])
def test_an_unverified_broker_is_refused(
    spawn: Spawn,
    tls_broker: TLSBroker,
    command: tuple[str, ...],
    trust: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    host, env = "127.0.0.1", {}
    if trust == "another CA":
        env = {"SSL_CERT_FILE": str(tls_broker.other_ca)}
    elif trust == "wrong host name":
        # Trusted CA, but the certificate names localhost and 127.0.0.1 only.
        host, env = "127.0.0.2", {"SSL_CERT_FILE": str(tls_broker.ca)}
    proc = run_to_end(spawn, *command, url=tls_broker.url("%2F", host), env=env)

    assert proc.popen.returncode == 1, proc.output
    assert len(proc.stderr_lines) == 1, proc.stderr
    (line,) = proc.stderr_lines
    assert f"amqps://guest@{host}:{tls_broker.port}" in line
    assert "CERTIFICATE_VERIFY_FAILED" in line or "certificate verify failed" in line
    assert ":guest@" not in proc.output
    assert proc.stdout == ""
