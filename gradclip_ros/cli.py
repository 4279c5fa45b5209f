"""The ``gradclip-ros`` command: run, replay, convert, train, eval and report.

Each subcommand lives in its own module with ``add_arguments(parser)`` and ``main(args)``;
modules are imported only when their subcommand runs, so ``--help`` stays fast and a
subcommand that needs no ROS never imports rclpy.
"""

import argparse
import importlib
import sys

# Subcommand -> (module, one-line help).
SUBCOMMANDS = {
    'run': ('gradclip_ros.run_graph', 'start the perception and online-learning nodes '
            '(optionally replaying a bag) from the YAML parameter files'),
    'replay': ('gradclip_ros.replay', 'publish a rosbag (rosbag2 or ROS 1) into the ROS graph'),
    'convert': ('gradclip_ros.convert', 'turn videos or image folders (with COCO or KITTI '
                'labels) into a rosbag2 file'),
    'train': ('gradclip_ros.offline', "fine-tune the detector offline on a bag's labeled frames"),
    'eval': ('gradclip_ros.offline', "measure a checkpoint's mAP and speed on a labeled bag"),
    'report': ('gradclip_ros.report', "plot a run directory's training log as PNG files"),
}


def build_parser(argv) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='gradclip-ros', description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    # Only the chosen subcommand's module is imported; the others get a stub parser for --help.
    chosen = next((arg for arg in argv if not arg.startswith('-')), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            adder = getattr(module, f'add_{name}_arguments', None) or module.add_arguments
            adder(sub)
            sub.set_defaults(handler=getattr(module, f'{name}_main', None) or module.main)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
