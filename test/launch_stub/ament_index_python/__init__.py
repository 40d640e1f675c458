"""Stand-in of ``ament_index_python`` (tests only)."""
