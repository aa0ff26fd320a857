"""``python tests/faults ROLE ...`` (how the tests start the fork server), or ``python -m faults ROLE ...``
with tests/ on sys.path: run one child-process role (see :func:`faults.processes.main`)."""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run by path: Python put this package's own folder on sys.path, not the one holding it
    _package_dir = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != _package_dir]
    sys.path.insert(0, str(_package_dir.parent))

from faults.processes import main

if __name__ == "__main__":
    main()
