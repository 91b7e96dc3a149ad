"""The ``lmgate`` entry point: the command line, handed the tray app to start when there is a
desktop. The one module that knows both front-ends, so neither imports the other."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tray_app.cli.main import EXIT_FAILURE, EXIT_OK, TrayLaunch
from tray_app.cli.main import main as run_command
from tray_app.garbage import settle_after_start


def run_tray(launch: TrayLaunch) -> int:
    try:
        from tray_app.ui.app import hand_to_running, run
    except ImportError as exc:
        print(
            f"lmgate: the tray app needs PySide6 ({exc.name} is missing): "
            "pip install 'lmgate[ui]', or run `lmgate serve` without a desktop.",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    if hand_to_running(launch.wishes):
        if launch.flags_given:
            print(
                f"lmgate: {' '.join(launch.flags_given)} did not reach it: a running LM Gate "
                "keeps its settings. Quit it (tray menu → Quit) and start it again with them.",
                file=sys.stderr,
            )
        return EXIT_OK
    from tray_app.control.desktop import desktop_controller

    controller = desktop_controller(overrides=launch.overrides, config_path=launch.config_path)
    # Everything is imported; the gateway's loop runs in this process. The young generation
    # keeps Python's threshold here: a window's wrapper caught in a cycle (a slot's lambda)
    # is freed, with its Qt object, as soon as it was before.
    settle_after_start(rarer_young_collections=False)
    return run(launch.wishes, controller)


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(argv, run_tray=run_tray)


if __name__ == "__main__":
    sys.exit(main())
