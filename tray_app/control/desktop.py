"""What the desktop tray runs: the controller on its own loop thread, with the user's config,
their login item, and logs in a file (a tray has no terminal to print to). The entry point
builds it and hands it to the UI, which builds no part of the core itself.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
from collections.abc import Mapping
from io import TextIOWrapper
from pathlib import Path

from tray_app.config.settings import load_config
from tray_app.control.autostart import Autostart, default_command
from tray_app.control.controller import Controller, ThreadedController, config_path_for
from tray_app.logs import JsonFormatter, route_library_logs, skip_unused_record_fields
from tray_app.paths import make_private_dir, user_log_dir
from tray_app.tunnel.ngrok import silence_pyngrok_logs

LOG_FILE = "lmgate.log"
LOG_BACKUPS = 3


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating log whose every file is 0600: it records errors, client addresses,
    principals and the public URL, which are no one else's to read. Each new file after a
    rollover is opened here too, so the umask never decides."""

    def _open(self) -> TextIOWrapper:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        Path(self.baseFilename).chmod(0o600)  # O_CREAT's mode holds only for a new file
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)


def configure_file_logging() -> None:
    directory = user_log_dir()
    make_private_dir(directory)  # tightens a directory an older version made 0755
    for backup in range(1, LOG_BACKUPS + 1):
        old = directory / f"{LOG_FILE}.{backup}"
        if old.exists():
            old.chmod(0o600)  # written before the logs were private
    handler = PrivateRotatingFileHandler(
        directory / LOG_FILE, maxBytes=5_000_000, backupCount=LOG_BACKUPS
    )
    handler.setFormatter(JsonFormatter())
    skip_unused_record_fields()
    root = logging.getLogger("lmgate")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
    route_library_logs(handler)


def desktop_controller(
    overrides: Mapping[str, object] | None = None, config_path: Path | None = None
) -> ThreadedController:
    """Nothing starts yet: the tray starts it once its icon shows. ``overrides`` are dotted
    keys from flags; they (and LMGATE_* variables) hold again after Settings saves, which
    writes to ``config_path`` (default: LMGATE_CONFIG, else the user's config file). A taken
    port is no dead end here: the tray runs on a free one and says so. Raises ConfigError for
    a config file that does not validate."""
    configure_file_logging()
    silence_pyngrok_logs()
    path = config_path or config_path_for(os.environ)
    return ThreadedController(
        Controller(
            load_config(path=path, overrides=overrides),
            config_path=path,
            overrides=overrides,
            autostart=Autostart(default_command()),
            port_fallback=True,
        )
    )
