"""The error for a value typed on the command line that a command cannot use (an ID, a scope, a
duration, an address): the person's input, not the config file, so it is not reported as a
config error, but it is a usage problem all the same (exit code 2)."""

from __future__ import annotations

from tray_app.errors import LMGateError


class InputError(LMGateError):
    """``what`` names the argument as typed (``--ttl``), or is empty when ``problem`` names it
    already (``no API key with ID 'x'``)."""

    def __init__(self, what: str, problem: str) -> None:
        self.what = what
        self.problem = problem
        super().__init__(f"{what}: {problem}" if what else problem)
