"""The library's logger: `get_logger(__name__)` everywhere in hftl, `console()` once where a program starts.

Inside a run (Accelerate's `PartialState` exists) a message is logged on the main process only, unless the call
passes `main_process_only=False`; outside one (unit tests calling a hook, `hftl` subcommands) it is logged as by
any `logging.Logger`, so nobody has to create a process group just to log.
"""

from __future__ import annotations

import logging
import os
import sys

from accelerate.logging import MultiProcessAdapter
from accelerate.logging import get_logger as accelerate_logger
from accelerate.state import PartialState

ROOT = "hftl"


class _Adapter(MultiProcessAdapter):
    # accelerate's adapter already knows the main process, `main_process_only` and `in_order`; what it lacks is a
    # way to log before any state exists (it raises), and its "[RANK n]" prefix would change every console line

    def process(self, msg, kwargs):
        kwargs.setdefault("stacklevel", 2)
        return msg, kwargs

    def log(self, level, msg, *args, **kwargs):
        if PartialState._shared_state != {}:
            super().log(level, msg, *args, **kwargs)
            return
        main_process_only = kwargs.pop("main_process_only", True)
        kwargs.pop("in_order", None)
        # `accelerate launch` sets RANK before any state exists: the other ranks stay quiet as they will in the run
        if main_process_only and os.environ.get("RANK", "0") != "0":
            return
        if self.isEnabledFor(level):
            msg, kwargs = self.process(msg, kwargs)
            self.logger.log(level, msg, *args, **kwargs)


def get_logger(name: str) -> _Adapter:
    """A logger for `name` (a module's `__name__`); `ACCELERATE_LOG_LEVEL` sets its level as for accelerate's own."""
    return _Adapter(accelerate_logger(name).logger, {})


def console(level: int | str = logging.INFO) -> None:
    """Shows hftl's messages on stdout, message only: where and as the recipes and the CLI printed them before
    (scripts and tests read them there). Called by the recipes' setup step, the compare recipe and the `hftl` CLI;
    a second call changes nothing, so no line appears twice."""
    logger = logging.getLogger(ROOT)
    logger.setLevel(level)
    if not any(isinstance(handler, _Stdout) for handler in logger.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)


class _Stdout(logging.StreamHandler):
    # the stream is looked up at each message: a program (or pytest's capture) that swaps sys.stdout after the
    # handler exists still gets the lines, and no line is written to a stream closed since
    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _):
        pass
