"""Conversations for the phone page and the seed's /api/chat, kept per principal in SQLite.

Every lookup is scoped to the principal: a conversation that is someone else's does not exist
(404), so one device can never read, continue or delete another's.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from tray_app.clock import Clock
from tray_app.storage.database import Database

TITLE_CHARS = 60


@dataclass(frozen=True, slots=True)
class Conversation:
    id: str
    title: str
    model: str | None
    created: float
    updated: float


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str
    reasoning: str | None
    created: float


def trim_history(messages: list[Message], budget_chars: int) -> list[Message]:
    """The newest messages whose text fits the budget; the newest one always goes."""
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
    messages: list[Message], content: str, *, replace: bool = False
) -> list[Message] | None:
    """The history up to its last user message, which says ``content``: what a retry or a
    regenerate answers again (that message must say ``content``; None if it says something
    else) or what an edit of it answers (``replace``: the message is replaced by ``content``)."""
    for index in range(len(messages) - 1, -1, -1):
        last = messages[index]
        if last.role == "user":
            if not replace:
                return messages[: index + 1] if last.content == content else None
            return [*messages[:index], Message("user", content, None, last.created)]
    return None


class ConversationStore:
    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock

    def create(self, principal: str, first_message: str, model: str | None) -> Conversation:
        now = self._clock.time()
        title = " ".join(first_message.split())[:TITLE_CHARS] or "New chat"
        conversation = Conversation(secrets.token_hex(8), title, model, now, now)
        with self._db.transaction() as conn:
            conn.execute(
                "INSERT INTO conversations (id, principal, title, model, created, "
                "updated) VALUES (?, ?, ?, ?, ?, ?)",
                (conversation.id, principal, title, model, now, now),
            )
        return conversation

    def get(self, principal: str, conversation_id: str) -> Conversation | None:
        rows = self._db.query(
            "SELECT * FROM conversations WHERE id = ? AND principal = ?",
            (conversation_id, principal),
        )
        if not rows:
            return None
        r = rows[0]
        return Conversation(r["id"], r["title"], r["model"], r["created"], r["updated"])

    def for_principal(self, principal: str) -> list[Conversation]:
        return [
            Conversation(r["id"], r["title"], r["model"], r["created"], r["updated"])
            for r in self._db.query(
                "SELECT * FROM conversations WHERE principal = ? ORDER BY updated DESC",
                (principal,),
            )
        ]

    def messages(self, conversation_id: str) -> list[Message]:
        return [
            Message(r["role"], r["content"], r["reasoning"], r["created"])
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
    ) -> bool:
        """Add a message; False (nothing stored) if the conversation was deleted meanwhile,
        e.g. while its answer was still streaming."""
        now = self._clock.time()
        with self._db.transaction() as conn:
            added = conn.execute(
                "INSERT INTO messages (conversation_id, role, content, reasoning, created) "
                "SELECT ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM conversations WHERE id = ?)",
                (conversation_id, role, content, reasoning or None, now, conversation_id),
            ).rowcount
            conn.execute(
                "UPDATE conversations SET updated = ?, model = COALESCE(?, model) WHERE id = ?",
                (now, model, conversation_id),
            )
        return added == 1

    def reopen_last_turn(
        self,
        conversation_id: str,
        content: str,
        *,
        model: str | None = None,
        replace: bool = False,
    ) -> bool:
        """Make the last user message, if it says ``content``, unanswered again: the answers
        after it (a partial one from a broken stream, or the one being regenerated) go.

        A retry of a failed turn then reuses the stored message instead of storing it twice.
        False (nothing changed) if the last user message says something else, e.g. because the
        failed request never reached LM Gate. With ``replace`` (an edit), the last user message
        is made to say ``content``."""
        with self._db.transaction() as conn:
            last = conn.execute(
                "SELECT id, content FROM messages WHERE conversation_id = ? AND role = 'user' "
                "ORDER BY id DESC LIMIT 1",
                (conversation_id,),
            ).fetchone()
            if last is None or (last[1] != content and not replace):
                return False
            if replace:
                conn.execute("UPDATE messages SET content = ? WHERE id = ?", (content, last[0]))
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
