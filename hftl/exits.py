"""How a run that stops on bad input ends: its message as the last thing it prints, and a non-zero exit code.

A Python traceback above the message hides it, and under `accelerate launch` the launcher's own
`CalledProcessError` traceback follows the child's output, so a hint line comes first and says so.
Set HFTL_TRACEBACK=1 to see the full traceback instead.
"""

from __future__ import annotations

import os
import sys

from hftl.system import launched_by_accelerate

# what hftl raises for input a user can fix (options, paths, ids, data); anything else keeps its traceback
USER_ERRORS = (ValueError, OSError, KeyError)
EXIT_CODE = 2


def run_or_exit(function, *args, **kwargs):
    """Calls `function`; on a user error prints it (after a hint under accelerate launch) and exits non-zero."""
    try:
        return function(*args, **kwargs)
    except USER_ERRORS as error:
        if os.environ.get("HFTL_TRACEBACK") == "1":
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        if launched_by_accelerate():
            print(  # noqa: T201 (the run's last words: shown whether or not logging is set up)
                "hftl stopped before finishing; accelerate launch shows its own traceback after this "
                "(`accelerate launch --quiet` hides it). The reason:",
                file=sys.stderr,
            )
        print(f"error: {message}", file=sys.stderr, flush=True)  # noqa: T201 (as above)
        sys.exit(EXIT_CODE)
