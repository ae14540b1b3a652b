"""Flow runs that need no heartbeat of their own.

Prefect sends flow-run heartbeats so that the server can tell a crashed deployment run (its
worker's machine died) from a live one. Prefect 3.8 stops a run's heartbeat thread by joining it
while it sleeps in one-second steps, so every flow run waits up to a second after its work is
done. Kiln turns heartbeats off where they tell the server nothing: flows the `kiln` command
runs in its own process (a crash ends the command, in front of the user), and a batch item's
export, which runs inside the batch run's process. Deployment runs keep Prefect's setting.
"""

from __future__ import annotations

from typing import Any


def without_heartbeats() -> Any:
    """A context in which the flow runs started (in this thread) send no heartbeats."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})
