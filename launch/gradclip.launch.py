"""Start perception and online learning together, optionally replaying a bag into them."""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess, IncludeLaunchDescription
from launch.conditions import IfCondition
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration, PythonExpression


def generate_launch_description():
    share = get_package_share_directory('gradclip_ros')
    shared_args = {
        name: LaunchConfiguration(name)
        for name in ('cameras', 'namespace', 'use_sim_time', 'model_dir')
    }
    bag = LaunchConfiguration('bag')
    return LaunchDescription([
        DeclareLaunchArgument(
            'cameras', default_value='front',
            description='Comma-separated camera names served by both nodes'),
        DeclareLaunchArgument(
            'perception_params_file',
            default_value=os.path.join(share, 'config', 'perception.yaml'),
            description='YAML file with the perception_node parameters'),
        DeclareLaunchArgument(
            'learning_params_file',
            default_value=os.path.join(share, 'config', 'online_learning.yaml'),
            description='YAML file with the online_learner_node parameters'),
        DeclareLaunchArgument(
            'namespace', default_value='',
            description='Namespace for both nodes and their relative topics'),
        DeclareLaunchArgument(
            'use_sim_time', default_value='false',
            description='Use /clock instead of wall time; set true with a bag replay'),
        DeclareLaunchArgument(
            'model_dir', default_value='/tmp/gradclip_ros/models',
            description='Folder where the learner hands over checkpoints to perception'),
        DeclareLaunchArgument(
            'bag', default_value='',
            description='rosbag2 or ROS 1 bag to replay (with /clock, looped); empty for none'),
        DeclareLaunchArgument(
            'replay_rate', default_value='1.0',
            description='Replay speed factor relative to the recorded timing'),
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(os.path.join(share, 'launch', 'perception.launch.py')),
            launch_arguments={
                **shared_args, 'params_file': LaunchConfiguration('perception_params_file'),
            }.items()),
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(
                os.path.join(share, 'launch', 'online_learning.launch.py')),
            launch_arguments={
                **shared_args, 'params_file': LaunchConfiguration('learning_params_file'),
            }.items()),
        ExecuteProcess(
            cmd=['ros2', 'run', 'gradclip_ros', 'gradclip-ros', 'replay', bag,
                 '--clock', '--loop', '0', '--rate', LaunchConfiguration('replay_rate')],
            condition=IfCondition(PythonExpression(["'", bag, "' != ''"])),
            output='screen',
        ),
    ])
