"""Sizes and durations as people write them: `500MB`, `1.5GB`, `800MiB`; `90s`, `10m`, `1h30m`."""

from __future__ import annotations

import re

from tasks.errors import KilnError

_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """`500MB` → 500 000 000 bytes (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024)."""
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise KilnError(f"cannot read {text!r} as a size; write it like 500MB, 1.5GB or 800MiB")
    return int(float(match.group(1)) * _UNITS[unit])


def human_size(n: int | float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?$")


def parse_duration(text: str) -> float:
    """`90`, `90s`, `10m`, `1h30m` → seconds (more than zero)."""
    raw = str(text).strip().lower().replace(" ", "")
    match = _DURATION.match(raw) if raw else None
    if not match or not any(match.groups()):
        raise KilnError(f"cannot read {text!r} as a duration; write it like 90s, 10m or 1h30m")
    h, m, s = (float(g) if g else 0.0 for g in match.groups())
    seconds = h * 3600 + m * 60 + s
    if seconds <= 0:
        raise KilnError(f"a duration of {text!r} is no time at all; give more than zero, e.g. 10m")
    return seconds
