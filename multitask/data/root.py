"""Where task data files live: a config key, else $MULTITASK_DATA_ROOT, else ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "MULTITASK_DATA_ROOT"
DEFAULT = Path("..") / "shared" / "data"


def data_root(configured: str | None = None) -> Path:
    if configured:
        return Path(configured).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    if DEFAULT.exists():
        return DEFAULT
    # Running from elsewhere than the repository root: look beside the repository itself.
    beside_repository = Path(__file__).resolve().parents[3] / "shared" / "data"
    return beside_repository if beside_repository.exists() else DEFAULT
