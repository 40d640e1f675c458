"""ROS 2 layer of lsm_ros (rclpy): the ``lsm_node`` node and what it is made of.

- ``isolation``: the localhost-only DDS environment for tests and demos (set before ``rclpy.init``);
- ``conversions``: numpy <-> sensor_msgs / geometry_msgs (images, camera infos, point clouds, poses);
- ``sync``: stereo pairing, CameraInfo lookup and the latest-pair-wins inference worker (no rclpy);
- ``params``: the node's ROS parameters, mirrored from :mod:`lsm_ros.config`;
- ``node``: ``LsmNode`` and the ``lsm_node`` entry point;
- ``bag_player``, ``synthetic``, ``demo``: play a stereo rosbag2 (EuRoC or a generated one) through the node.

Submodules are imported on use: ``isolation`` and ``sync`` need no ROS installation.
"""
