"""Checks that take seconds and run before any data or model work, so a run that cannot finish fails at once.

A read-only output folder used to be found at the first checkpoint, after a whole epoch; a mistyped model id after
every image had been opened. Here: the output folder can be created and written (a probe file), and the model
resolves (a local folder with config.json, a bundled name, or one metadata request to the Hub). The dataset gets
the same quick Hub check as the first step of loading it (`hftl.data.load_dataset_dict`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hftl.modeling import resolve_model_path


def check_output_dir_writable(output_dir: str) -> None:
    """Raises naming `--output_dir` unless it is (or can be made) a folder this process can write. A folder that
    does not exist yet is probed by making and removing a scratch folder in its nearest existing parent, so a run
    that fails later for another reason leaves nothing behind."""
    out = Path(output_dir).absolute()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--output_dir {output_dir} is an existing file, not a folder: pick another path.")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(
            f"--output_dir {output_dir} cannot be created: {parent} is a file, not a folder. Pick another path."
        )
    try:
        if parent == out:
            with tempfile.NamedTemporaryFile(dir=out, prefix=".hftl-write-probe-"):
                pass
        else:
            scratch = tempfile.mkdtemp(dir=parent, prefix=".hftl-write-probe-")
            with open(os.path.join(scratch, "probe"), "wb"):
                pass
            os.remove(os.path.join(scratch, "probe"))
            os.rmdir(scratch)
    except OSError as error:
        where = "written to" if parent == out else f"created (in {parent})"
        raise PermissionError(
            f"--output_dir {output_dir} cannot be {where}: {error.strerror or error}. Pick a folder you can write, "
            "or fix its permissions."
        ) from None


def preflight(config) -> None:
    """Every check that is quick and would otherwise fail late; run first by `hftl.runner.run_config`."""
    check_output_dir_writable(config.train.output_dir)
    resolve_model_path(config.model.model, config.model.revision)
