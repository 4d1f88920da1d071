"""A driver the executor tests kill: it runs slow jobs on a process pool, each writing its worker's pid.

``python -c "import orphan_driver; orphan_driver.main(OUT_DIR, WHERE)"`` with ``WHERE`` ``main``
(the pool is driven from the main thread) or ``thread`` (from another thread, where the
kernel's parent-death signal is not used and the workers' watchdog must do the job).
"""

from __future__ import annotations

import os
import threading
import time

from bitwidth.executors import ProcessExecutor


def slow(out_dir: str, item: int) -> int:
    open(os.path.join(out_dir, f"{os.getpid()}.pid"), "w").close()
    time.sleep(120)
    return item


def main(out_dir: str, where: str) -> None:
    ex = ProcessExecutor(workers=2)

    def drive() -> None:
        for _ in ex.map_unordered(slow, out_dir, [0, 1]):
            pass

    if where == "thread":
        t = threading.Thread(target=drive)
        t.start()
        t.join()
    else:
        drive()
