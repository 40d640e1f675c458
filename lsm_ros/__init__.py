"""lsm_ros: the Large Spatial Model for ROS 2.

Layers, each importable alone:
- ``lsm_ros.model``: the networks, pure PyTorch (no ROS);
- ``lsm_ros.pipeline``: images in, a typed reconstruction out (no ROS);
- ``lsm_ros.ros``: the rclpy node, message conversions and stereo synchronisation;
- ``lsm_ros.cli``: the ``lsm-ros`` command.
"""
import pkgutil as _pkgutil

# The generated interfaces (lsm_ros.msg, lsm_ros.srv) may live in another directory named lsm_ros
# (site-packages of a pip-only set-up, or a colcon install space): let this package find them.
__path__ = _pkgutil.extend_path(__path__, __name__)

__version__ = '0.1.0'
