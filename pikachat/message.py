"""What travels on the chat exchange, and how it reaches a terminal safely.

A chat message is a small JSON object:

    {"kind": "say", "sender": "ash", "sender_id": "5c0f...", "text": "hi", "time": 1700000000.5}

``kind`` is "say" for a line, "join" or "leave" for chat.py's notices (their
``text`` is empty); ``sender_id`` is random per process, so that chat.py can
recognise its own messages; ``time`` is the sender's clock, in seconds since
the epoch. Fields a receiver does not know are ignored.

Anyone who can publish to the exchange can put anything in a body, so
``decode`` checks every field and ``render`` makes any control character
visible (``\\x1b``) instead of letting it reach the terminal: an escape
sequence from the network could otherwise recolour the screen, retitle the
window, or hide text.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

# The fanout exchange that senders publish to and receivers bind their queues to.
EXCHANGE = "pikachat"
KINDS = ("say", "join", "leave")
# Bodies larger than this are not parsed at all.
MAX_BODY = 16 * 1024
# Longer text and names are cut when shown (and text when sent).
MAX_TEXT = 2000
MAX_NAME = 32
MAX_ID = 64
# Characters shown as escapes besides the C0/DEL/C1 controls and surrogates:
# bidirectional overrides, which can make a line read backwards, and the
# Unicode line and paragraph separators, which can start a new line.
INVISIBLE = frozenset("\u061c\u200e\u200f\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


@dataclass(frozen=True)
class Message:
    """One chat message: a line said, or someone joining or leaving."""

    kind: str
    sender: str
    sender_id: str
    text: str
    time: float


def encode(message: Message) -> bytes:
    """Return the JSON body for ``message``."""
    return json.dumps(asdict(message), ensure_ascii=False).encode()


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not a number")


def decode(body: bytes) -> Message:
    """Return the message in ``body``; raise ValueError saying what is wrong.

    The reason never quotes the body, so it is safe to show.
    """
    if len(body) > MAX_BODY:
        raise ValueError(f"too big ({len(body)} bytes, at most {MAX_BODY})")
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_no_constants)
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except ValueError:
        raise ValueError("not JSON") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    for field in ("kind", "sender", "sender_id", "text"):
        if not isinstance(data.get(field), str):
            raise ValueError(f'"{field}" missing or not a string')
    if data["kind"] not in KINDS:
        raise ValueError('unknown "kind"')
    if not data["sender"] or not data["sender_id"] or len(data["sender_id"]) > MAX_ID:
        raise ValueError('empty "sender", or bad "sender_id"')
    sent = data.get("time")
    # bool is an int to Python; and a time must be one strftime can show.
    if isinstance(sent, bool) or not isinstance(sent, int | float) or not 0 <= sent < 1e11:
        raise ValueError('"time" missing or not a time')
    return Message(data["kind"], data["sender"], data["sender_id"], data["text"], float(sent))


def clean(text: str, limit: int) -> str:
    """Return ``text`` cut to ``limit`` characters, every control character made visible.

    ``"\\x1b[31m"`` becomes the 8 characters ``\\x1b[31m``: readable, but
    inert. The result is always one line.
    """
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    out = []
    for char in text:
        code = ord(char)
        if code < 0x20 or 0x7F <= code <= 0x9F:
            out.append(f"\\x{code:02x}")
        elif char in INVISIBLE or 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


def render(message: Message) -> str:
    """Return the line a receiver prints: ``HH:MM:SS name: text`` or a notice."""
    clock = time.strftime("%H:%M:%S", time.localtime(message.time))
    name = clean(message.sender, MAX_NAME)
    if message.kind == "join":
        return f"{clock} * {name} joined"
    if message.kind == "leave":
        return f"{clock} * {name} left"
    return f"{clock} {name}: {clean(message.text, MAX_TEXT)}"
