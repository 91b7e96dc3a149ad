"""LM Gate's database (SQLite): credentials, devices, pairing codes, usage and conversations.
Every SQL statement is a named method here; nothing above this layer writes SQL."""
