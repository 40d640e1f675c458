"""Where the project's shared data lives (datasets, the parity reference): never part of the package."""
from __future__ import annotations

import os
from pathlib import Path


def shared_directory() -> Path:
    """The project's shared data folder: ``$LSM_ROS_SHARED``, else ``<repository>/../shared``."""
    return Path(os.environ.get('LSM_ROS_SHARED') or Path(__file__).resolve().parents[2] / 'shared')
