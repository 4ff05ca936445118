"""The up-front image check under several ranks: opened once, on the main process, the findings sent to all."""

import json

import pytest

from tests.fixtures.data import launch_two_ranks

SCRIPT = """
import json, sys
from pathlib import Path
from accelerate import Accelerator
import hftl.image_check as image_check
from tests.test_data import _with_bad_files

accelerator = Accelerator(cpu=True)
folder = Path(sys.argv[1])
if accelerator.is_main_process:  # writes the files, then every rank builds the same rows
    dsd = _with_bad_files(folder)
accelerator.wait_for_everyone()
if not accelerator.is_main_process:
    dsd = _with_bad_files(folder)
accelerator.wait_for_everyone()
scans = []
real_scan = image_check._scan
image_check._scan = lambda *args: scans.append(1) or real_scan(*args)
kept, skipped = image_check.check_images(dsd, "image", on_bad_image="skip", shared=True)
record = {"scans": len(scans), "kept": [len(kept[s]) for s in ("train", "validation", "test")], "skipped": skipped}
(folder / f"rank{accelerator.process_index}.json").write_text(json.dumps(record))
"""


@pytest.mark.slow
def test_two_ranks_check_the_images_once_and_drop_the_same_rows(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(SCRIPT)
    launch_two_ranks(script, tmp_path, timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["scans"] for r in ranks] == [2, 0]  # train and validation (test is the same rows), on rank 0 only
    assert ranks[0]["kept"] == ranks[1]["kept"] == [2, 1, 1]
    assert ranks[0]["skipped"] == ranks[1]["skipped"]
    assert ranks[1]["skipped"]["train"] == [str(tmp_path / "broken.jpg")]
