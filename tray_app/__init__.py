"""LM Gate: put a local LM Studio on the internet behind an authenticating, default-deny gateway.

The package is split in two layers: a core with no Qt (config, auth, proxy, tunnel, secrets) and
``tray_app.ui``, the only place that imports PySide6.
"""

__version__ = "0.1.0"
