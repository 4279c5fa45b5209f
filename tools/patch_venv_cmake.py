"""Point the ROS 2 wheels' CMake exports at this venv's Python and numpy headers.

The ros-* wheels are built in a manylinux image, so their exported CMake files name
include directories under /opt/python/cp311-cp311/, which does not exist here.
This script rewrites those paths inside the given venv only; it is idempotent.
"""

import pathlib
import sys
import sysconfig

import numpy

BUILD_PREFIX = '/opt/python/cp311-cp311'


def main(venv: str) -> int:
    root = pathlib.Path(venv).resolve()
    python_include = sysconfig.get_paths()['include']
    numpy_include = numpy.get_include()
    replacements = {
        f'{BUILD_PREFIX}/include/python3.11': python_include,
        f'{BUILD_PREFIX}/lib/python3.11/site-packages/numpy/_core/include': numpy_include,
    }

    patched = 0
    for path in (root / 'share').rglob('*.cmake'):
        text = path.read_text(encoding='utf-8', errors='surrogateescape')
        if BUILD_PREFIX not in text:
            continue
        for old, new in replacements.items():
            text = text.replace(old, new)
        if BUILD_PREFIX in text:
            print(f'error: {path} names an unknown path under {BUILD_PREFIX}', file=sys.stderr)
            return 1
        path.write_text(text, encoding='utf-8', errors='surrogateescape')
        patched += 1

    print(f'patched {patched} CMake files under {root}/share')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else '.venv'))
