"""The old name of ``deployments/serve_deployments.py`` (before 2026-12-06), kept so that existing service files
and muscle memory still work: ``python deployments/serve.py`` runs it with the same arguments."""

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    target = Path(__file__).with_name("serve_deployments.py")
    os.execv(sys.executable, [sys.executable, str(target), *sys.argv[1:]])
