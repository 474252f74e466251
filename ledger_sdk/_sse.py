"""A server-sent-events decoder: lines in, events out (the WHATWG event-stream rules the stream uses)."""

from __future__ import annotations

from dataclasses import dataclass

DATA_BYTES_MAX = 1024 * 1024


@dataclass(frozen=True)
class ServerSentEvent:
    event: str
    data: str
    id: str | None


class SSEDecoder:
    """Feed it one line at a time (without its line ending); a blank line completes an event."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []
        self._size = 0
        self._id: str | None = None
        self.last_event_id: str | None = None

    def feed(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):  # a comment: the server's heartbeat
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._size += len(value)
            if self._size > DATA_BYTES_MAX:
                raise ValueError(f"an event's data is larger than {DATA_BYTES_MAX} bytes")
            self._data.append(value)
        elif name == "id" and "\x00" not in value:
            self._id = value
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        if self._id is not None:
            self.last_event_id = self._id
        if not self._data:
            self._event, self._id = "", None
            return None
        event = ServerSentEvent(self._event or "message", "\n".join(self._data), self.last_event_id)
        self._event, self._data, self._size, self._id = "", [], 0, None
        return event
