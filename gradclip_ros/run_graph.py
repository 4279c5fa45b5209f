"""``gradclip-ros run``: start the nodes (and a bag replay) where ``ros2 launch`` is missing.

Each node runs as a child process with the same YAML parameter files and overrides that
launch/gradclip.launch.py passes, so both ways of starting the graph behave alike. Ctrl-C
sends SIGINT to every child, waits for the learner to finish its step and write its
checkpoint, and escalates to SIGTERM and SIGKILL only after a timeout.
"""

import argparse
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

PACKAGE_ROOT = pathlib.Path(__file__).resolve().parents[1]
STOP_TIMEOUT_S = 30.0  # the learner may be in a training step and then writes a checkpoint


def default_params_files() -> List[str]:
    config = PACKAGE_ROOT / 'config'
    return [str(config / 'perception.yaml'), str(config / 'online_learning.yaml')]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        '--params', action='append', metavar='YAML',
        help='ROS 2 parameter file, repeatable; each node reads the section named after it '
             '(default: config/perception.yaml and config/online_learning.yaml)')
    parser.add_argument('--bag', help='bag to replay into the graph (rosbag2 or ROS 1)')
    parser.add_argument('--cameras', nargs='+', help='camera names (overrides the YAML)')
    parser.add_argument('--model-dir', help='folder where checkpoints are handed over')
    parser.add_argument('--checkpoint-dir', help="folder of the learner's own checkpoints")
    parser.add_argument('--run-dir', help='folder of the training logs')
    parser.add_argument('--namespace', default='', help='namespace of both nodes')
    parser.add_argument('--no-learner', action='store_true',
                        help='start only the perception node')
    parser.add_argument('--use-sim-time', action='store_true',
                        help='nodes follow /clock; the replay publishes it')
    parser.add_argument('--rate', type=float, default=1.0,
                        help='replay speed factor (0 = as fast as possible)')
    parser.add_argument('--loop', type=int, default=0,
                        help='replay loops (default 0 = until stopped, as the launch file does)')
    parser.add_argument('--duration', type=float, default=0.0,
                        help='stop everything after this many seconds (0 = until Ctrl-C or '
                             'the end of the replay)')


def node_command(module: str, params_files: List[str], overrides: Dict[str, str],
                 namespace: str) -> List[str]:
    """Build ``python -m MODULE --ros-args ...`` with the parameter files and overrides."""
    command = [sys.executable, '-m', module, '--ros-args']
    for path in params_files:
        command += ['--params-file', path]
    for name, value in overrides.items():
        command += ['-p', f'{name}:={value}']
    if namespace:
        command += ['-r', f'__ns:=/{namespace.strip("/")}']
    return command


def namespace_remaps(bag: str, namespace: str) -> List[str]:
    """Return replay ``--remap`` arguments that move the bag's topics under ``namespace``."""
    from gradclip_ros.bags import list_topics  # reads the bag; no ROS needed

    prefix = '/' + namespace.strip('/')
    arguments = []
    for topic in list_topics(bag):
        arguments += ['--remap', f'{topic}:={prefix}{topic}']
    return arguments


def build_commands(args) -> Dict[str, List[str]]:
    params = [str(pathlib.Path(p).resolve()) for p in (args.params or default_params_files())]
    for path in params:
        if not pathlib.Path(path).is_file():
            raise FileNotFoundError(f'parameter file not found: {path}')

    common = {}
    if args.cameras:
        common['cameras'] = '[' + ','.join(f"'{c}'" for c in args.cameras) + ']'
    if args.use_sim_time:
        common['use_sim_time'] = 'true'
    perception = dict(common)
    learner = dict(common)
    if args.model_dir:
        perception['model_dir'] = args.model_dir
        learner['handover_dir'] = args.model_dir
    if args.checkpoint_dir:
        learner['checkpoint_dir'] = args.checkpoint_dir
    if args.run_dir:
        learner['run_dir'] = args.run_dir

    commands = {'perception': node_command(
        'gradclip_ros.perception_node', params, perception, args.namespace)}
    if not args.no_learner:
        commands['learner'] = node_command(
            'gradclip_ros.online_learner_node', params, learner, args.namespace)
    if args.bag:
        # The nodes take seconds to import torch, so the replay waits for their subscriptions.
        replay = [sys.executable, '-m', 'gradclip_ros.cli', 'replay', args.bag,
                  '--rate', str(args.rate), '--loop', str(args.loop),
                  '--wait-for-subscribers', '60']
        if args.use_sim_time:
            replay.append('--clock')
        if args.namespace:
            replay += namespace_remaps(args.bag, args.namespace)
        commands['replay'] = replay
    return commands


def stop_children(children: Dict[str, subprocess.Popen], timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGINT every child, then SIGTERM and SIGKILL those still running after ``timeout``."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        alive = {name: child for name, child in children.items() if child.poll() is None}
        if not alive:
            return
        for child in alive.values():
            child.send_signal(signum)
        deadline = time.monotonic() + (timeout if signum == signal.SIGINT else 5.0)
        while time.monotonic() < deadline and any(c.poll() is None for c in alive.values()):
            time.sleep(0.1)
        still = [name for name, child in alive.items() if child.poll() is None]
        if still and signum != signal.SIGKILL:
            print(f'gradclip-ros run: {", ".join(still)} still running after '
                  f'{signal.Signals(signum).name}; escalating', file=sys.stderr)


def main(args) -> int:
    try:
        commands = build_commands(args)
    except FileNotFoundError as error:
        print(f'gradclip-ros run: {error}', file=sys.stderr)
        return 2

    # Children get their own process group, so a terminal Ctrl-C reaches only this process
    # and the shutdown order below stays under control.
    children: Dict[str, subprocess.Popen] = {}
    for name, command in commands.items():
        print(f'gradclip-ros run: starting {name}: {" ".join(command)}', flush=True)
        children[name] = subprocess.Popen(command, start_new_session=True, env=os.environ.copy())

    deadline: Optional[float] = time.monotonic() + args.duration if args.duration > 0 else None
    exit_code = 0
    try:
        while True:
            time.sleep(0.2)
            if deadline is not None and time.monotonic() >= deadline:
                break
            replay = children.get('replay')
            if replay is not None and replay.poll() is not None:
                print(f'gradclip-ros run: replay finished with exit code {replay.returncode}',
                      flush=True)
                exit_code = replay.returncode
                break
            failed = [n for n, c in children.items() if n != 'replay' and c.poll() is not None]
            if failed:
                print(f'gradclip-ros run: {", ".join(failed)} exited unexpectedly '
                      f'(exit code {children[failed[0]].returncode})', file=sys.stderr)
                exit_code = 1
                break
    except KeyboardInterrupt:
        print('gradclip-ros run: stopping (Ctrl-C)', flush=True)
    finally:
        stop_children(children)
    return exit_code
