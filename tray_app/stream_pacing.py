"""The stream check's pacing, shared by the two sides that must agree on it: the gateway's
``POST /stream-check`` sends :data:`EVENTS` SSE events :data:`INTERVAL_SECONDS` apart (the
first at once), and the tunnel's check judges what arrived against that pacing. Neither side
may import the other (siblings in the layers), so the numbers live here."""

from __future__ import annotations

PATH = "/stream-check"
EVENTS = 6
INTERVAL_SECONDS = 0.1
# From the first event to the last, as the server sends them.
SPAN_SECONDS = (EVENTS - 1) * INTERVAL_SECONDS
