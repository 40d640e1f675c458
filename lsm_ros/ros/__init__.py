"""ROS 2 layer of lsm_ros (rclpy): the ``lsm_node`` node and what it is made of.

- ``isolation``: the localhost-only DDS environment for tests and demos (set before ``rclpy.init``);
- ``conversions``: numpy <-> sensor_msgs / geometry_msgs (images, camera infos, point clouds, poses);
- ``sync``: stereo pairing, CameraInfo lookup and the latest-pair-wins inference worker (no rclpy);
- ``params``: the node's ROS parameters, mirrored from :mod:`lsm_ros.config`;
- ``node``: ``LsmNode`` and the ``lsm_node`` entry point, wiring its parts: ``inputs`` (subscriptions, sync, checks
  with ``input_checks`` and ``calibration``), ``worker`` (the inference thread), ``publishers`` (the products),
  ``service_host`` (~/query, ~/render; answered by ``services``), ``model_manager`` (the model's life cycle),
  ``diagnostics_reporter`` (/diagnostics, built by ``diagnostics``), ``counters``, ``names`` and ``node_main``;
- ``bag_player``, ``synthetic``, ``demo``: play a stereo rosbag2 (EuRoC or a generated one) through the node.

Submodules are imported on use: ``isolation`` and ``sync`` need no ROS installation.
"""
