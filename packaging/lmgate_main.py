"""Entry point for the PyInstaller build (packaging/lmgate.spec)."""

from tray_app.main import main

raise SystemExit(main())
