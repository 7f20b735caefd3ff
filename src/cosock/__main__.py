"""``python -m cosock`` and the ``cosock`` command.

``cosock run -- CMD...`` starts every program a user (or a test) runs under cosock, so it is
dispatched here without loading the command-line framework and the lab (about half a
second); every other form, ``cosock run`` without ``--`` included, goes to :mod:`cosock.cli`.
"""

from __future__ import annotations

import sys


def main() -> None:
    argv = sys.argv[1:]
    if len(argv) >= 3 and argv[0] == "run" and argv[1] == "--":
        from ._run import run_main

        sys.exit(run_main(argv[2:]))
    from .cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
