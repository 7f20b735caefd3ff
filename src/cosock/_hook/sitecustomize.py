"""Start-up hook put on PYTHONPATH by ``cosock run``: enables cosock in every Python
process of the command, children included, then runs any other sitecustomize."""

import importlib.machinery
import importlib.util
import os
import sys

if os.environ.get("COSOCK_ENABLE") == "1":
    try:
        import cosock

        cosock.enable()
    except Exception as exc:  # never break the program: it still works on plain TCP
        sys.stderr.write(f"cosock: not enabled ({exc})\n")

_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _here]
)
if _spec is not None and _spec.loader is not None:
    _mod = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_mod)
