"""What the device imports: the agent daemon stays clear of the fleet's heavy libraries.

Idle RSS is measured by ``bench/infer.py``; this test keeps the cause of the biggest past
regression out (pydantic alone was ~10 MB of an ~80 MB agent).
"""

from __future__ import annotations

import json
import subprocess
import sys

FLEET_ONLY = ("pydantic", "fastapi", "sqlmodel", "sqlalchemy", "uvicorn", "typer", "rich",
              "httpx", "psycopg")


def test_the_daemon_imports_none_of_the_fleet_libraries():
    code = (
        "import json, sys, agent.cli, agent.daemon, agent.endpoint, agent.installer; "
        "print(json.dumps(sorted({name.partition('.')[0] for name in sys.modules})))"
    )
    loaded = json.loads(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True).stdout
    )
    assert "msgspec" in loaded  # the contract is imported, so the check is meaningful
    assert [name for name in FLEET_ONLY if name in loaded] == []
    assert "fleet" not in loaded, "the device imports no fleet code (tests/test_boundaries.py)"
