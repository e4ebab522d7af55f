"""A process and its children as Linux's /proc shows them: the benchmarks count the CPU time an
engine process's server and child spend together, and tests check a server leaves no child behind.
"""

from __future__ import annotations

import os


def stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields from the state on (field 3: the state, 4: the parent's pid, 14 and
    15: user and system clock ticks), or None for a process that is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command's name, field 2, is in parentheses and may hold spaces or parentheses.
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def children(pid: int) -> set[int]:
    """The live (not zombie) processes whose parent is `pid`."""
    return {int(e) for e in filter(str.isdigit, os.listdir("/proc"))
            if (fields := stat_fields(int(e))) and fields[0] != "Z" and int(fields[1]) == pid}


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process and its live children (an engine process's)."""
    ticks = 0
    for p in (pid, *children(pid)):
        fields = stat_fields(p)
        if fields:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")
