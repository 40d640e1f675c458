"""Stand-in of ``launch_ros`` (tests only)."""
