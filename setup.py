"""Build script for the gradclip_ros ament_python package."""

from glob import glob

from setuptools import find_packages, setup

package_name = 'gradclip_ros'

setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(exclude=['test', 'test.*']),
    # The fused clipping kernel is compiled from this source on the target machine
    # (gradclip_ros.clip_kernel), so it ships as a file and the package cannot run zipped.
    package_data={package_name: ['csrc/*.cpp']},
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml']),
        ('share/' + package_name + '/launch', glob('launch/*.launch.py')),
        ('share/' + package_name + '/config', glob('config/*.yaml')),
    ],
    install_requires=['setuptools'],
    zip_safe=False,
    maintainer='gradclip_ros developers',
    maintainer_email='gradclip-ros@example.com',
    description='Camera perception that fine-tunes itself with clipped gradients.',
    license='Apache-2.0',
    entry_points={
        'console_scripts': [
            'perception_node = gradclip_ros.perception_node:main',
            'online_learner_node = gradclip_ros.online_learner_node:main',
            'gradclip-ros = gradclip_ros.cli:main',
        ],
    },
)
