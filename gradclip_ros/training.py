"""ROS-free training core of the online learner; this module gathers its public names.

The parts live in their own modules:

- ``trainer_config``: ``TrainerConfig`` and ``config_from_parameters`` (ROS parameters in).
- ``replay_buffer``: ``Frame``, ``prepare_frame``, ``ReplayBuffer``, ``HoldoutSet``.
- ``trainer``: ``Trainer`` (steps, safety gates, validation, hand-over).
- ``checkpoint_manager``: ``CheckpointManager`` (atomic pairs, pruning, resume).
"""

from gradclip_ros.checkpoint_manager import CheckpointManager, version_name
from gradclip_ros.replay_buffer import Frame, HoldoutSet, prepare_frame, ReplayBuffer
from gradclip_ros.trainer import HANDOVER_PREFIX, JsonLinesLog, Trainer
from gradclip_ros.trainer_config import config_from_parameters, TrainerConfig

__all__ = [
    'CheckpointManager', 'config_from_parameters', 'Frame', 'HANDOVER_PREFIX', 'HoldoutSet',
    'JsonLinesLog', 'prepare_frame', 'ReplayBuffer', 'Trainer', 'TrainerConfig',
    'version_name',
]
