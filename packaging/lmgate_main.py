"""Entry point for the PyInstaller build (packaging/lmgate.spec)."""

from tray_app.cli import main

raise SystemExit(main())
