"""Loaded by every Python process whose PYTHONPATH holds this folder (site imports
``sitecustomize``): a DVC stage (``DVC_STAGE`` set) writes, when it exits, the source files of the
``nnbp`` modules it loaded into ``$NNBP_TEST_MODULES/<stage>.<pid>.json``
(tests/test_stage_deps.py)."""

import atexit
import json
import os
import sys


def _record() -> None:
    folder, stage = os.environ.get("NNBP_TEST_MODULES"), os.environ.get("DVC_STAGE")
    if not folder or not stage:
        return
    files = sorted(
        str(getattr(module, "__file__", None))
        for name, module in list(sys.modules.items())
        if (name == "nnbp" or name.startswith("nnbp.")) and getattr(module, "__file__", None)
    )
    path = os.path.join(folder, f"{stage.replace('/', '_')}.{os.getpid()}.json")
    with open(path, "w") as f:
        json.dump({"stage": stage, "files": files}, f)


atexit.register(_record)
