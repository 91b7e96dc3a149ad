"""Where secrets live: one small interface and its backends (the OS keyring, a private file,
the environment, memory). Never a silent plaintext fallback."""
