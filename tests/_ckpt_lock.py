"""Helper of tests/test_checkpoint_integrity.py: a second process that writes checkpoints.

``python tests/_ckpt_lock.py DIR`` opens a manager on DIR, prints ``LOCKED`` and sleeps
until killed. With ``--try`` it only tries to open one: exit 0 if it could, 3 (printing the
refusal) if the directory is in use.
"""

from __future__ import annotations

import sys
import time

from jaxlora.checkpoint import CheckpointError, CheckpointManager


def main(directory: str, mode: str = "hold") -> int:
    try:
        mgr = CheckpointManager(directory)
    except CheckpointError as e:
        print(e, flush=True)
        return 3
    if mode == "--try":
        mgr.close()
        return 0
    print("LOCKED", flush=True)
    time.sleep(600)  # the test kills us long before
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
