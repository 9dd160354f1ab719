"""torchrun, as launch.sh runs it:  python -m runtime.launch [torchrun args] -m runtime.train PLAN

The same launcher (torch.distributed.run), with one difference: when a worker stopped on the
user's error (exit EXIT_USER, already reported in one line by the first rank that saw it:
runtime/errors.py), it exits EXIT_USER without torchrun's traceback and failure summary, which
would bury that line. Any other failure is reported by torchrun exactly as before.
"""
from __future__ import annotations

import logging
import sys

from .errors import EXIT_USER


def _not_a_user_error(record: logging.LogRecord) -> bool:
    """Drop the agent's "failed (exitcode: 3) local_rank ..." line: the worker's line says it."""
    return f"(exitcode: {EXIT_USER})" not in record.getMessage()


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_not_a_user_error)

    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        if any(f.exitcode == EXIT_USER for f in e.failures.values()):
            return EXIT_USER
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
