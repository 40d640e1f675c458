"""Launch lsm_node on a rectified stereo camera (and optionally RViz2).

    ros2 launch lsm_ros lsm.launch.py dust3r_checkpoint:=/path/DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth \
        left_image:=/stereo/left/image_rect right_image:=/stereo/right/image_rect use_rviz:=true

The node runs in ``namespace`` (default ``lsm``): its products are ``/lsm/lsm_node/{points, left/depth,
right/depth, left/camera_info, right/camera_info, relative_pose, info}``, with the semantic model
(lsm_checkpoint) also ``semantic/labels``, ``semantic/overlay`` and the text-query service ``query``.
Parameters come from ``params_file``
(default: the package's config/lsm.yaml); the arguments device, *_checkpoint and publish_tf override it only
when they are not empty.

Life cycle: ``managed:=false`` (default) starts a plain node that configures and activates itself. ``managed:=true``
starts it as a lifecycle node (its parameter ``managed`` set to true: it waits unconfigured); with ``autostart``
(default true) the launch then requests configure at once and activate when configure has brought the node to
'inactive'; ``autostart:=false`` leaves the transitions to you or a lifecycle manager
(``ros2 lifecycle set /lsm/lsm_node configure``, ``... activate``).

RViz2 (``use_rviz:=true``) opens config/lsm.rviz with its fixed frame set by ``fixed_frame`` (default ``cam0``, the
demo's left optical frame): give your left camera's optical frame, or a robot frame TF connects it to.

Network: the node keeps the environment's ROS settings; with ROS_AUTOMATIC_DISCOVERY_RANGE unset it stays on
localhost (export ROS_AUTOMATIC_DISCOVERY_RANGE=SUBNET to reach other machines).
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, EmitEvent, OpaqueFunction, RegisterEventHandler
from launch.events import matches_action
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from lifecycle_msgs.msg import Transition

PACKAGE = 'lsm_ros'
# lsm_node input (relative name) -> launch argument holding the topic it is remapped to, and its default.
INPUT_REMAPS = (
    ('left/image_rect', 'left_image', '/stereo/left/image_rect'),
    ('right/image_rect', 'right_image', '/stereo/right/image_rect'),
    ('left/camera_info', 'left_info', '/stereo/left/camera_info'),
    ('right/camera_info', 'right_info', '/stereo/right/camera_info'),
)
# Launch arguments that override node parameters of the params file when not empty.
STRING_OVERRIDES = ('device', 'dust3r_checkpoint', 'lseg_checkpoint', 'lsm_checkpoint')
BOOL_OVERRIDES = ('publish_tf',)
_TRUE, _FALSE = ('true', '1', 'yes', 'on'), ('false', '0', 'no', 'off')
DEFAULT_FIXED_FRAME = 'cam0'   # the left optical frame of the demo's stereo stream (config/lsm.rviz's own)


def _as_bool(name, value):
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f'launch argument {name}:={value!r} is not a boolean (true/false)')


def _change_state(node, transition_id):
    """The event asking ``node`` (a LifecycleNode action) for a lifecycle transition."""
    return EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(node), transition_id=transition_id))


def _launch_setup(context, *args, **kwargs):
    """The actions, with the launch arguments' values (empty override arguments leave the params file alone; the
    node's ``managed`` parameter always follows the ``managed`` argument, so that the action type matches it)."""
    def value(name):
        return LaunchConfiguration(name).perform(context)

    managed = _as_bool('managed', value('managed'))
    autostart = _as_bool('autostart', value('autostart'))
    overrides = {name: value(name) for name in STRING_OVERRIDES if value(name)}
    overrides.update({name: _as_bool(name, value(name)) for name in BOOL_OVERRIDES if value(name)})
    overrides['managed'] = managed
    node_arguments = dict(
        package=PACKAGE, executable='lsm_node', name='lsm_node', namespace=value('namespace'), output='screen',
        parameters=[value('params_file'), overrides],
        remappings=[(node_topic, value(argument)) for node_topic, argument, _ in INPUT_REMAPS])
    if not managed:
        actions = [Node(**node_arguments)]
    else:
        lsm_node = LifecycleNode(**node_arguments)
        actions = [lsm_node]
        if autostart:   # configure now; activate once configure has brought the node to 'inactive'
            actions = [
                RegisterEventHandler(OnStateTransition(
                    target_lifecycle_node=lsm_node, start_state='configuring', goal_state='inactive',
                    entities=[_change_state(lsm_node, Transition.TRANSITION_ACTIVATE)])),
                lsm_node,
                _change_state(lsm_node, Transition.TRANSITION_CONFIGURE)]
    if _as_bool('use_rviz', value('use_rviz')):
        rviz_config = os.path.join(get_package_share_directory(PACKAGE), 'config', 'lsm.rviz')
        actions.append(Node(package='rviz2', executable='rviz2', name='rviz2', output='screen',
                            arguments=['-d', rviz_config, '--fixed-frame', value('fixed_frame')]))
    return actions


def generate_launch_description():
    share = get_package_share_directory(PACKAGE)
    arguments = [
        DeclareLaunchArgument('namespace', default_value='lsm',
                              description='namespace of lsm_node (products: /<namespace>/lsm_node/...)'),
        DeclareLaunchArgument('params_file', default_value=os.path.join(share, 'config', 'lsm.yaml'),
                              description='YAML file with the lsm_node parameters'),
        DeclareLaunchArgument('device', default_value='',
                              description="torch device: auto, cpu, cuda or cuda:N (empty: params_file's)"),
        DeclareLaunchArgument('dust3r_checkpoint', default_value='',
                              description="DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth (empty: params_file's)"),
        DeclareLaunchArgument('lseg_checkpoint', default_value='',
                              description="LSeg demo_e200.ckpt (empty: params_file's)"),
        DeclareLaunchArgument('lsm_checkpoint', default_value='',
                              description="LSM checkpoint-final.pth (empty: params_file's)"),
        DeclareLaunchArgument('publish_tf', default_value='',
                              description="true/false: broadcast left -> right camera on /tf (empty: params_file's)"),
        DeclareLaunchArgument('use_rviz', default_value='false', description='also start RViz2 with config/lsm.rviz'),
        DeclareLaunchArgument('fixed_frame', default_value=DEFAULT_FIXED_FRAME,
                              description="RViz2's fixed frame (e.g. your robot's base or the left camera's optical "
                                          'frame); the products are in the left camera frame'),
        DeclareLaunchArgument('managed', default_value='false',
                              description='true: start lsm_node as a lifecycle node that waits for configure and '
                                          'activate; false: it configures and activates itself'),
        DeclareLaunchArgument('autostart', default_value='true',
                              description='with managed:=true, request configure at start and activate once the '
                                          'node is inactive (false: leave the transitions to a lifecycle manager)'),
    ]
    arguments += [DeclareLaunchArgument(argument, default_value=default,
                                        description=f'topic remapped to lsm_node input {node_topic}')
                  for node_topic, argument, default in INPUT_REMAPS]
    return LaunchDescription(arguments + [OpaqueFunction(function=_launch_setup)])
