"""pip entry point; the metadata lives in setup.cfg. On a ROS workstation colcon builds the package with
CMakeLists.txt (ament_cmake + ament_cmake_python) instead."""
from setuptools import setup

setup()
