"""Start the online-learning node with parameters from config/online_learning.yaml."""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def parse_cameras(text):
    cameras = [name.strip() for name in text.replace('[', '').replace(']', '').split(',')]
    return [name for name in cameras if name]


def launch_setup(context):
    cameras = parse_cameras(LaunchConfiguration('cameras').perform(context))
    model_dir = LaunchConfiguration('model_dir').perform(context)
    overrides = {
        'cameras': cameras,
        'use_sim_time': LaunchConfiguration('use_sim_time').perform(context) == 'true',
        'handover_dir': model_dir,
        'checkpoint_dir': LaunchConfiguration('checkpoint_dir').perform(context),
        'run_dir': LaunchConfiguration('run_dir').perform(context),
    }
    camera_root = LaunchConfiguration('camera_root').perform(context).rstrip('/')
    remappings = []
    if camera_root:
        for camera in cameras:
            for suffix in ('image_raw', 'image_raw/compressed', 'labels'):
                remappings.append((f'{camera}/{suffix}', f'{camera_root}/{camera}/{suffix}'))
    remappings.append(('model_updates', LaunchConfiguration('model_updates_topic')))
    remappings.append(('training_stats', LaunchConfiguration('training_stats_topic')))
    return [Node(
        package='gradclip_ros',
        executable='online_learner_node',
        name='online_learner_node',
        namespace=LaunchConfiguration('namespace'),
        parameters=[LaunchConfiguration('params_file').perform(context), overrides],
        remappings=remappings,
        output='screen',
    )]


def generate_launch_description():
    share = get_package_share_directory('gradclip_ros')
    return LaunchDescription([
        DeclareLaunchArgument(
            'cameras', default_value='front',
            description='Comma-separated camera names; each subscribes to <camera>/image_raw '
                        'and <camera>/labels'),
        DeclareLaunchArgument(
            'params_file', default_value=os.path.join(share, 'config', 'online_learning.yaml'),
            description='YAML file with the online_learner_node parameters'),
        DeclareLaunchArgument(
            'namespace', default_value='',
            description='Namespace for the node and its relative topics'),
        DeclareLaunchArgument(
            'use_sim_time', default_value='false',
            description='Use /clock (for example from a bag replay) instead of wall time'),
        DeclareLaunchArgument(
            'model_dir', default_value='/tmp/gradclip_ros/models',
            description='Folder the validated checkpoints are handed over in; must be the '
                        "perception node's model_dir"),
        DeclareLaunchArgument(
            'checkpoint_dir', default_value='/tmp/gradclip_ros/checkpoints',
            description="Folder of the learner's own checkpoints; it resumes from the newest"),
        DeclareLaunchArgument(
            'run_dir', default_value='/tmp/gradclip_ros/run',
            description='Folder of the JSON-lines training log'),
        DeclareLaunchArgument(
            'camera_root', default_value='',
            description='Topic prefix of the cameras, e.g. /sensors/camera; empty keeps '
                        'the topics relative'),
        DeclareLaunchArgument(
            'model_updates_topic', default_value='model_updates',
            description='Topic that carries paths of handed-over checkpoints'),
        DeclareLaunchArgument(
            'training_stats_topic', default_value='training_stats',
            description='Topic of the per-step training statistics'),
        OpaqueFunction(function=launch_setup),
    ])
