"""hftl/log.py: one logger for library code, inside a run (main process only) and outside one (no state)."""

import logging

from hftl.log import ROOT, console, get_logger


def test_logs_without_any_accelerate_state(caplog):
    with caplog.at_level(logging.INFO, logger=ROOT):
        get_logger("hftl.somewhere").info("no state needed")
    assert [r.getMessage() for r in caplog.records] == ["no state needed"]  # no "[RANK 0]" prefix


def test_a_launched_non_main_rank_stays_quiet_unless_asked(caplog, monkeypatch):
    from accelerate.state import PartialState

    # as `accelerate launch` sets it for rank 1, before the run has created its state
    monkeypatch.setattr(PartialState, "_shared_state", {})
    monkeypatch.setenv("RANK", "1")
    logger = get_logger("hftl.somewhere")
    with caplog.at_level(logging.INFO, logger=ROOT):
        logger.info("main only")
        logger.info("every rank", main_process_only=False)
    assert [r.getMessage() for r in caplog.records] == ["every rank"]


def test_console_shows_messages_alone_on_stdout_once(capsys):
    root = logging.getLogger(ROOT)
    before, level = list(root.handlers), root.level
    try:
        console()
        console()  # the recipe's setup and the CLI may both call it
        get_logger("hftl.somewhere").info("as printed before")
        get_logger("hftl.somewhere").debug("not at INFO")
        assert capsys.readouterr().out.splitlines().count("as printed before") == 1
    finally:
        root.handlers[:] = before
        root.setLevel(level)
