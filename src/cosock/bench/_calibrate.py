"""How much parallel CPU the machine really gives: one busy-looping process per CPU, for a
fraction of a second, and the CPU time they got in total per wall-clock second.

On a shared VM "2 CPUs" may deliver about one CPU of work when both are busy (the host
time-shares the vCPUs).  Spinning waiters then take the CPU their peer needs, which is
what a reader of the numbers must know, so the figure goes into the report.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

_SPINNER = (
    "import sys, time\n"
    "start, end = float(sys.argv[1]), float(sys.argv[2])\n"
    "time.sleep(max(0.0, start - time.time()))\n"
    "cpu = time.process_time()\n"
    "while time.time() < end: pass\n"
    "print(time.process_time() - cpu)\n"
)


def parallel_capacity(seconds: float = 0.4) -> tuple[float, int]:
    """(CPU seconds per wall second delivered to ``n`` concurrent spinners, ``n``)."""
    n = len(os.sched_getaffinity(0))
    start = time.time() + 0.3  # every spinner is up before the window opens
    end = start + seconds
    procs = [
        subprocess.Popen(
            [sys.executable, "-S", "-c", _SPINNER, repr(start), repr(end)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    total = 0.0
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds + 30)
        total += float(out.strip() or 0.0)
    return total / seconds, n
