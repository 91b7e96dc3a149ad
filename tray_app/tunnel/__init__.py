"""Going public: the tunnel provider interface, the manager that proves and keeps the public
URL, ngrok (through pyngrok, never its downloading shim) and LAN mode."""
