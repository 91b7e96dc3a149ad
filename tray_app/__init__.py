"""LM Gate: put a local LM Studio on the internet behind an authenticating, default-deny gateway.

The subpackages are the layers, each importing only those below it (checked by
``lint-imports`` against ``.importlinter``): ``cli`` and ``ui`` (the front-ends) > ``control``
> ``gateway`` and ``tunnel`` > ``identity`` > ``storage`` and ``secret_store`` > ``config`` >
the base modules beside this file. Only ``tray_app.ui`` imports PySide6.
"""

__version__ = "0.1.0"
