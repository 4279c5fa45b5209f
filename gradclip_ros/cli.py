"""The `gradclip-ros` command: run, replay, convert, train, eval and report."""

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='gradclip-ros', description=__doc__)
    parser.add_subparsers(dest='command', required=True)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    parser.parse_args(argv)
    return 0


if __name__ == '__main__':
    sys.exit(main())
