"""Run a command; write its peak RSS and CPU time (from wait4) as JSON to a file.

    python -m tests.benchmarks.peak OUT.json CMD [ARGS...]   # exits with CMD's exit code

Why a launcher: on Linux a process's ru_maxrss starts at the RSS of the process that forked and
exec'd it (the exec keeps the old memory's high-water mark), so a command started straight from
the benchmark, which has held a day of rows at times, would report at least the benchmark's own
peak. Started from this small process instead, it reports its own.
"""

import json
import os
import subprocess
import sys


def main() -> int:
    out, cmd = sys.argv[1], sys.argv[2:]
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    with open(out, "w") as f:
        json.dump({"maxrss_kb": usage.ru_maxrss, "cpu_s": usage.ru_utime + usage.ru_stime, "exit": code}, f)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
