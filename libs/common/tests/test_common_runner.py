"""The serving process's start: the import heap is frozen before the server runs."""

import json
import subprocess
import sys

# In a process of its own: freezing is for the life of a process, not for pytest's.
_PROBE = """
import gc, json, sys
from common.runner import freeze_import_heap
freeze_import_heap("common.health:health_router")
print(json.dumps({
    "imported": "common.health" in sys.modules,
    "frozen": gc.get_freeze_count(),
    "tracked": len(gc.get_objects()),
}))
"""


def test_the_app_modules_are_imported_and_left_out_of_every_collection() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, timeout=60
    )
    seen = json.loads(out.stdout)
    assert seen["imported"]
    # What the import made is frozen; the collector is left with the few objects made since.
    assert seen["frozen"] > 10_000
    assert seen["tracked"] < seen["frozen"] / 10
