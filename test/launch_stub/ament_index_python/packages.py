"""Stand-in of ``ament_index_python.packages`` (tests only): the share of lsm_ros is the source tree."""
from __future__ import annotations

import os
from pathlib import Path

SHARE_DIRECTORIES = {'lsm_ros': os.environ.get('LSM_ROS_STUB_SHARE', str(Path(__file__).resolve().parents[3]))}
requested: list[str] = []


class PackageNotFoundError(KeyError):
    pass


def get_package_share_directory(package_name: str, print_warning: bool = True) -> str:
    requested.append(package_name)
    if package_name not in SHARE_DIRECTORIES:
        raise PackageNotFoundError(f"package '{package_name}' not found")
    return SHARE_DIRECTORIES[package_name]
