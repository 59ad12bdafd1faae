"""Peak resident memory of the current process, for the benchmark records.

On Linux ``ru_maxrss`` is not a process's own peak when it was started by a large parent: the
kernel carries the parent's high-water mark across fork and exec. A child of a 2.3 GiB Python
process reported 2.3 GiB after exec while its own peak was 9 MiB. ``VmHWM`` in
``/proc/self/status`` belongs to the address space created by exec, so it is used where it
exists; elsewhere ``ru_maxrss`` (bytes on macOS, KiB on Linux) is the fallback.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")


def peak_rss_bytes() -> int:
    """The peak resident set size of this process since it started, in bytes."""
    if _STATUS.exists():
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024


__all__ = ["peak_rss_bytes"]
