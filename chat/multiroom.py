"""The JSON protocol of the multi-room endpoint (``CHAT_JSON_PATH``, default ``/ws``), I/O-free.

``/`` and ``/rooms/<name>`` speak plain text, one room per socket, as the 2015 clients
and tsung expect; a client of ``/ws`` joins and leaves rooms, sends to any room it is
in, and gets every message tagged with its room and id. One JSON object per text frame
each way (README.md, "The JSON endpoint", has the table)::

    -> {"op": "join", "room": "general", "since": "<id>", "ref": 1}
    <- {"type": "joined", "room": "general", "recovered": true, "ref": 1}
    <- {"type": "message", "room": "general", "id": "<id>", "text": "hi"}
    -> {"op": "send", "room": "general", "text": "hello"}
    -> {"op": "leave", "room": "general"}
    <- {"type": "left", "room": "general"}
    <- {"type": "error", "error": "not_member", "message": "...", "ref": ...}

This module only reads requests and writes events: what they do to rooms is the hub's
(``Hub.handle_request``). A request it cannot read raises :class:`RequestError`, which
the hub answers with an error event; nothing here ever closes a connection.

A message id is the 24 bytes the backplane gives (a 16-byte origin and an 8-byte
sequence; the hub draws its own in one process), written as 32 characters of
base64url. To a client it is opaque: it only hands the last one it saw back as
``since``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass

from .errors import ChatError

__all__ = ["Request", "RequestError", "ERROR_CODES", "OPS", "LOBBY", "ROOM_NAME", "MAX_REF",
           "parse_request", "room_key", "room_label", "format_id", "parse_id", "event",
           "message_event", "USER_PREFIX", "user_key"]

# Room names as the URLs accept them (chat.views.RoomConverter); the lobby is "lobby".
ROOM_NAME = re.compile(r"[A-Za-z0-9_.~-]{1,64}")
LOBBY = "lobby"
# A user's personal room key: "@" + identity. "@" is never in a room name, so no client
# can join one; each connection with that identity is a member of it.
USER_PREFIX = "@"
MAX_REF = 64  # characters of a string "ref"
OPS = ("join", "leave", "send")
ERROR_CODES = ("bad_json", "unknown_op", "bad_room", "not_member", "room_limit", "forbidden",
               "bad_field")
_ID_SIZE = 24
_COMPACT = (",", ":")


class RequestError(ChatError):
    """A request the server will not act on: an error event, never a dropped connection."""

    def __init__(self, code: str, message: str, ref: str | int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref

    def event(self) -> str:
        return event("error", error=self.code, message=self.message, ref=self.ref)


@dataclass(slots=True, frozen=True)
class Request:
    """One client request, checked: ``room`` is the hub's key (the lobby is ``""``)."""

    op: str
    room: str
    ref: str | int | None = None
    text: str | None = None  # send
    since: str | None = None  # join: the last message id the client saw, as it sent it


def room_key(name: str) -> str:
    """The hub's key for a room name: the lobby is ``""``."""
    return "" if name == LOBBY else name


def room_label(key: str) -> str:
    """What clients call a room key (the lobby's ``""`` is ``lobby``)."""
    return key or LOBBY


def user_key(user: str) -> str:
    """The room key every connection of ``user`` is a member of."""
    return USER_PREFIX + user


def format_id(msg_id: bytes) -> str:
    return base64.urlsafe_b64encode(msg_id).decode("ascii").rstrip("=")


def parse_id(text: str) -> bytes | None:
    """The id a client sent back as ``since``; None when it is not one of ours."""
    if len(text) != 32:
        return None
    try:
        msg_id = base64.urlsafe_b64decode(text)
    except (binascii.Error, ValueError):
        return None
    return msg_id if len(msg_id) == _ID_SIZE else None


def _ref(request: dict) -> str | int | None:
    ref = request.get("ref")
    if ref is None:
        return None
    if type(ref) is int or type(ref) is str and len(ref) <= MAX_REF:
        return ref
    raise RequestError("bad_field", f"ref must be a string of at most {MAX_REF} characters "
                       "or an integer")


def parse_request(text: str) -> Request:
    """Read one text frame of a client; raises :class:`RequestError` for what is wrong
    with it (the first thing found), carrying its ``ref`` when that could be read."""
    try:
        request = json.loads(text)
    except ValueError:
        raise RequestError("bad_json", "not JSON") from None
    if type(request) is not dict:
        raise RequestError("bad_json", "not a JSON object")
    ref = _ref(request)
    op = request.get("op")
    if op not in OPS:
        raise RequestError("unknown_op", f"op must be one of {', '.join(OPS)}", ref)
    name = request.get("room")
    if type(name) is not str:
        raise RequestError("bad_field", "room must be a string", ref)
    if not ROOM_NAME.fullmatch(name):
        raise RequestError("bad_room", "a room name is 1-64 characters of A-Z a-z 0-9 _ . ~ -",
                           ref)
    room = room_key(name)
    if op == "send":
        message = request.get("text")
        if type(message) is not str:
            raise RequestError("bad_field", "send needs a text string", ref)
        return Request(op, room, ref, text=message)
    if op == "join":
        since = request.get("since")
        if since is not None and type(since) is not str:
            raise RequestError("bad_field", "since must be a message id (a string)", ref)
        return Request(op, room, ref, since=since)
    return Request(op, room, ref)


def event(kind: str, ref: str | int | None = None, **fields) -> str:
    """A server event as JSON text: ``type`` first, ``ref`` last when the request had one."""
    body = {"type": kind, **fields}
    if ref is not None:
        body["ref"] = ref
    return json.dumps(body, separators=_COMPACT, ensure_ascii=False)


def message_event(room: str, msg_id: bytes, message: str | bytes) -> str:
    """A message of room key ``room``: ``text``, or ``data`` (base64) for a binary one."""
    if type(message) is str:
        return json.dumps({"type": "message", "room": room_label(room), "id": format_id(msg_id),
                           "text": message}, separators=_COMPACT, ensure_ascii=False)
    return json.dumps({"type": "message", "room": room_label(room), "id": format_id(msg_id),
                       "data": base64.b64encode(message).decode("ascii")}, separators=_COMPACT)
