#!/usr/bin/env python3
"""``lsm-ros bench`` as a plain script (no installation needed): speed and memory of the pipeline per stage, or of
the ROS path with ``--ros`` (which keeps DDS on loopback itself). Every option of ``lsm-ros bench --help``:

    .venv/bin/python scripts/bench.py --threads 2 --resolutions 256 --json bench.json
    .venv/bin/python scripts/bench.py --ros --quick --duration 10
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lsm_ros.cli import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main(['bench', *sys.argv[1:]]))
