"""Credentials from Prefect Secret blocks: `HF_TOKEN` and friends for deployment runs, never parameters.

A deployment names the blocks in its environment (`KILN_SECRETS=HF_TOKEN=hf-token`, a job
variable in deployments/prefect.yaml or the worker's own environment); the flow run loads each
block on the worker and sets the variable in its own process only, where huggingface_hub reads
it when it calls the Hub. The value is never a parameter, never logged, never written to an
artifact or manifest, and Kiln's messages scrub it (`tasks.fetch.hub.redact`); converter
subprocesses do not get it (`tasks.toolchain.converter_env`).
"""

from __future__ import annotations

import os

from tasks.errors import KilnError
from tasks.settings import secret_blocks


class SecretMissing(KilnError):
    """`KILN_SECRETS` names a Secret block the Prefect server does not hold."""


def load_secrets() -> list[str]:
    """Each `KILN_SECRETS` variable from its Secret block, into this process's environment; the names set."""
    blocks = secret_blocks()
    if not blocks:
        return []
    from prefect.blocks.system import Secret

    for var, block in blocks.items():
        try:
            value = Secret.load(block).get()
        except ValueError:  # Prefect's answer for a block it does not have
            raise SecretMissing(
                f"KILN_SECRETS: the Prefect server has no Secret block {block!r} for {var}; create it "
                f"(UI: Blocks → Secret, or `Secret(value=...).save({block!r})`), or remove it from KILN_SECRETS"
            ) from None
        if not isinstance(value, str) or not value:
            raise SecretMissing(f"KILN_SECRETS: Secret block {block!r} for {var} is not a non-empty string")
        os.environ[var] = value
    return list(blocks)
