"""keep_freed_memory: a freed image-size array comes back without the kernel
zeroing fresh pages (docs/photometry.md, "Compiled speed")."""

from __future__ import annotations

import subprocess
import sys

import pytest

# In a child process: the allocator setting is process-wide and stays.
_CHILD = """
import resource, sys
import numpy as np
from tasks.allocator import keep_freed_memory

def faults_of_a_quadrant_pass():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        image = np.ones((3080, 3072), np.float32)  # a ZTF quadrant, 38 MB
        del image
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_a_quadrant_pass()
default = faults_of_a_quadrant_pass()
taken = keep_freed_memory()
faults_of_a_quadrant_pass()
kept = faults_of_a_quadrant_pass()
print(taken, default, kept)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_quadrant_arrays_are_reused():
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    taken, default, kept = out[0] == "True", int(out[1]), int(out[2])
    assert taken
    # Default: every pass faults its pages in again (38 MB = 9,000 4-KiB pages,
    # or 19 huge pages when numpy's madvise applies); kept: next to none.
    assert default >= 3 * 19, default
    assert kept < 20, kept
