"""Peak memory of a command and every process it starts (Ray's included)."""

from __future__ import annotations

import subprocess
import threading
import time

import psutil


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def run_and_measure(cmd: list[str], interval: float = 1.0, **popen) -> dict:
    """Run ``cmd``; sample the summed RSS and PSS of its process tree; return peaks.

    Reading every process's smaps costs CPU that the measured job would otherwise use
    (it skewed the 2-core timings by ~25% at 4 samples/s), so sample once a second:
    a job's memory climbs as its actors start and then holds, so the peak is caught.
    """
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )
    root = psutil.Process(proc.pid)
    peaks = {"rss": 0, "pss": 0, "processes": 0}
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    start = time.perf_counter()
    while proc.poll() is None:
        rss = pss = 0
        procs = _tree(root)
        for p in procs:
            try:
                info = p.memory_full_info()
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
            except psutil.Error:
                pass
        peaks["rss"] = max(peaks["rss"], rss)
        peaks["pss"] = max(peaks["pss"], pss)
        peaks["processes"] = max(peaks["processes"], len(procs))
        time.sleep(interval)
    reader.join(timeout=5)
    peaks["seconds"] = time.perf_counter() - start
    peaks["returncode"] = proc.returncode
    peaks["output"] = "".join(out)
    return peaks
