"""Start the perception node with parameters from config/perception.yaml."""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def camera_remappings(cameras, camera_root):
    """Map each camera's relative topics under ``camera_root`` (no remapping when empty)."""
    if not camera_root:
        return []
    root = camera_root.rstrip('/')
    remappings = []
    for camera in cameras:
        for suffix in ('image_raw', 'image_raw/compressed'):
            remappings.append((f'{camera}/{suffix}', f'{root}/{camera}/{suffix}'))
    return remappings


def parse_cameras(text):
    cameras = [name.strip() for name in text.replace('[', '').replace(']', '').split(',')]
    return [name for name in cameras if name]


def launch_setup(context):
    cameras = parse_cameras(LaunchConfiguration('cameras').perform(context))
    overrides = {
        'cameras': cameras,
        'use_sim_time': LaunchConfiguration('use_sim_time').perform(context) == 'true',
        'model_dir': LaunchConfiguration('model_dir').perform(context),
    }
    checkpoint = LaunchConfiguration('checkpoint').perform(context)
    if checkpoint:
        overrides['checkpoint'] = checkpoint
    return [Node(
        package='gradclip_ros',
        executable='perception_node',
        name='perception_node',
        namespace=LaunchConfiguration('namespace'),
        parameters=[LaunchConfiguration('params_file').perform(context), overrides],
        remappings=camera_remappings(cameras, LaunchConfiguration('camera_root').perform(context))
        + [('model_updates', LaunchConfiguration('model_updates_topic'))],
        output='screen',
    )]


def generate_launch_description():
    share = get_package_share_directory('gradclip_ros')
    return LaunchDescription([
        DeclareLaunchArgument(
            'cameras', default_value='front',
            description='Comma-separated camera names; each subscribes to <camera>/image_raw'),
        DeclareLaunchArgument(
            'params_file', default_value=os.path.join(share, 'config', 'perception.yaml'),
            description='YAML file with the perception_node parameters'),
        DeclareLaunchArgument(
            'namespace', default_value='',
            description='Namespace for the node and its relative topics'),
        DeclareLaunchArgument(
            'use_sim_time', default_value='false',
            description='Use /clock (for example from a bag replay) instead of wall time'),
        DeclareLaunchArgument(
            'model_dir', default_value='/tmp/gradclip_ros/models',
            description='Only checkpoints under this folder are accepted as weight updates'),
        DeclareLaunchArgument(
            'checkpoint', default_value='',
            description='Starting safetensors checkpoint; empty starts from random weights'),
        DeclareLaunchArgument(
            'camera_root', default_value='',
            description='Topic prefix of the cameras, e.g. /sensors/camera; empty keeps '
                        '<camera>/image_raw relative'),
        DeclareLaunchArgument(
            'model_updates_topic', default_value='model_updates',
            description='Topic that carries paths of new checkpoints (std_msgs/String)'),
        OpaqueFunction(function=launch_setup),
    ])
