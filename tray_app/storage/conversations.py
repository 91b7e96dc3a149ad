"""Conversations for the phone page and the seed's /api/chat, kept per principal in SQLite.

Every lookup is scoped to the principal: a conversation that is someone else's does not exist
(404), so one device can never read, continue or delete another's.

A conversation keeps its system prompt (``system``, "" for none); a user message keeps the photo
sent with it (``image``, a data URL already checked by /api/chat), so the history shows it and
a retry, an edit or a regenerate of that turn sends it again.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from tray_app.clock import Clock
from tray_app.storage.database import Database, Row

TITLE_CHARS = 60


@dataclass(frozen=True, slots=True)
class Conversation:
    id: str
    title: str
    model: str | None
    created: float
    updated: float
    system: str = ""


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str
    reasoning: str | None
    created: float
    image: str | None = None


def trim_history(messages: list[Message], budget_chars: int) -> list[Message]:
    """The newest messages whose text fits the budget; the newest one always goes. (A photo
    is not counted: its cost in tokens depends on the model, and /api/chat bounds how many
    photos it resends instead.)"""
    kept: list[Message] = []
    used = 0
    for message in reversed(messages):
        size = len(message.content)
        if kept and used + size > budget_chars:
            break
        kept.append(message)
        used += size
    return list(reversed(kept))


def up_to_last_turn(
    messages: list[Message], content: str, *, replace: bool = False, image: str | None = None
) -> list[Message] | None:
    """The history up to its last user message, which says ``content``: what a retry or a
    regenerate answers again (that message must say ``content``; None if it says something
    else) or what an edit of it answers (``replace``: the message is replaced by ``content``,
    keeping its photo unless ``image`` brings a new one)."""
    for index in range(len(messages) - 1, -1, -1):
        last = messages[index]
        if last.role == "user":
            if not replace:
                return messages[: index + 1] if last.content == content else None
            kept = image or last.image
            return [*messages[:index], Message("user", content, None, last.created, kept)]
    return None


def _conversation(r: Row) -> Conversation:
    return Conversation(
        r["id"], r["title"], r["model"], r["created"], r["updated"], r["system"] or ""
    )


class ConversationStore:
    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock

    def create(
        self, principal: str, first_message: str, model: str | None, *, system: str = ""
    ) -> Conversation:
        now = self._clock.time()
        title = " ".join(first_message.split())[:TITLE_CHARS] or "New chat"
        conversation = Conversation(secrets.token_hex(8), title, model, now, now, system)
        with self._db.transaction() as conn:
            conn.execute(
                "INSERT INTO conversations (id, principal, title, model, created, "
                "updated, system) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (conversation.id, principal, title, model, now, now, system or None),
            )
        return conversation

    def get(self, principal: str, conversation_id: str) -> Conversation | None:
        rows = self._db.query(
            "SELECT * FROM conversations WHERE id = ? AND principal = ?",
            (conversation_id, principal),
        )
        return _conversation(rows[0]) if rows else None

    def for_principal(self, principal: str) -> list[Conversation]:
        return [
            _conversation(r)
            for r in self._db.query(
                "SELECT * FROM conversations WHERE principal = ? ORDER BY updated DESC, rowid DESC",
                (principal,),
            )
        ]

    def set_system(self, conversation_id: str, system: str) -> None:
        """The system prompt every later turn starts with ("" for none)."""
        with self._db.transaction() as conn:
            conn.execute(
                "UPDATE conversations SET system = ? WHERE id = ?",
                (system or None, conversation_id),
            )

    def messages(self, conversation_id: str) -> list[Message]:
        return [
            Message(r["role"], r["content"], r["reasoning"], r["created"], r["image"])
            for r in self._db.query(
                "SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,)
            )
        ]

    def append(
        self,
        conversation_id: str,
        role: str,
        content: str,
        *,
        reasoning: str | None = None,
        model: str | None = None,
        image: str | None = None,
    ) -> bool:
        """Add a message; False (nothing stored) if the conversation was deleted meanwhile,
        e.g. while its answer was still streaming."""
        now = self._clock.time()
        with self._db.transaction() as conn:
            # The conversation's row first: where writers do not queue for one lock (a shared
            # database), its row lock keeps a delete from slipping in before the message.
            exists = conn.execute(
                "UPDATE conversations SET updated = ?, model = COALESCE(?, model) WHERE id = ?",
                (now, model, conversation_id),
            ).rowcount
            if exists != 1:
                return False
            conn.execute(
                "INSERT INTO messages (conversation_id, role, content, reasoning, created, "
                "image) VALUES (?, ?, ?, ?, ?, ?)",
                (conversation_id, role, content, reasoning or None, now, image),
            )
        return True

    def reopen_last_turn(
        self,
        conversation_id: str,
        content: str,
        *,
        model: str | None = None,
        replace: bool = False,
        image: str | None = None,
    ) -> bool:
        """Make the last user message, if it says ``content``, unanswered again: the answers
        after it (a partial one from a broken stream, or the one being regenerated) go.

        A retry of a failed turn then reuses the stored message instead of storing it twice.
        False (nothing changed) if the last user message says something else, e.g. because the
        failed request never reached LM Gate. With ``replace`` (an edit), the last user message
        is made to say ``content`` (and, given an ``image``, to hold that photo; else it keeps
        its own)."""
        with self._db.transaction() as conn:
            last = conn.execute(
                "SELECT id, content FROM messages WHERE conversation_id = ? AND role = 'user' "
                "ORDER BY id DESC LIMIT 1",
                (conversation_id,),
            ).fetchone()
            if last is None or (last[1] != content and not replace):
                return False
            if replace:
                conn.execute(
                    "UPDATE messages SET content = ?, image = COALESCE(?, image) WHERE id = ?",
                    (content, image, last[0]),
                )
            conn.execute(
                "DELETE FROM messages WHERE conversation_id = ? AND id > ?",
                (conversation_id, last[0]),
            )
            conn.execute(
                "UPDATE conversations SET updated = ?, model = COALESCE(?, model) WHERE id = ?",
                (self._clock.time(), model, conversation_id),
            )
        return True

    def delete(self, principal: str, conversation_id: str) -> bool:
        with self._db.transaction() as conn:
            return (
                conn.execute(
                    "DELETE FROM conversations WHERE id = ? AND principal = ?",
                    (conversation_id, principal),
                ).rowcount
                == 1
            )
