"""The gateway: an aiohttp application that authenticates, filters and relays requests to
LM Studio. ``server/`` runs it on hardened connections; ``upstream/`` is the only code that
talks to LM Studio."""
