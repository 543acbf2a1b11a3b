"""The resume tests' fault injection: SIGKILL the process at a named point of a run, through the checkpointer's event
hooks (``avalanche_drcpsd.experiments.checkpoint.EVENT_HOOKS``). Test code: the library holds only the hook list."""

import contextlib
import os
import signal
import sys

from avalanche_drcpsd.experiments.checkpoint import EVENT_HOOKS, EVENT_WHEN, PHASES


class KillSwitch:
    """``"<exp>:<phase>[:<when>]"``: call :meth:`fire` (SIGKILL this process) when the run reaches that point
    (``when``: ``end``, the default, after the phase's work and before its checkpoint; ``start``; ``checkpoint``,
    half-way through writing it)."""

    def __init__(self, spec: str):
        parts = spec.strip().split(":")
        if len(parts) not in (2, 3) or not parts[0].isdigit() or parts[1] not in PHASES or \
                (len(parts) == 3 and parts[2] not in EVENT_WHEN):
            raise ValueError(f"kill point {spec!r}; expected '<experience>:<phase>[:<when>]' with a phase in "
                             f"{list(PHASES)} and when in {list(EVENT_WHEN)}")
        self.target = (int(parts[0]), parts[1], parts[2] if len(parts) == 3 else "end")

    def __call__(self, experience: int, phase: str, when: str) -> None:
        if (experience, phase, when) == self.target:
            self.fire()

    @staticmethod
    def fire() -> None:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def kill_at(spec: str):
    """Install a :class:`KillSwitch` for ``spec`` in the checkpointer's event hooks while the block runs."""
    switch = KillSwitch(spec)
    EVENT_HOOKS.append(switch)
    try:
        yield switch
    finally:
        EVENT_HOOKS.remove(switch)
