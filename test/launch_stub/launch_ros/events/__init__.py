"""Stand-in of ``launch_ros.events`` (tests only)."""
