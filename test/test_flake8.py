"""ament_flake8 over the package, tests, benchmarks, launch files and tools."""

import pathlib

from ament_flake8.main import main_with_errors
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.flake8
@pytest.mark.linter
def test_flake8():
    folders = ('gradclip_ros', 'test', 'benchmarks', 'launch', 'tools')
    paths = [str(REPO / name) for name in folders if (REPO / name).exists()]
    config = str(REPO / 'tools' / 'ament_flake8.ini')
    rc, errors = main_with_errors(argv=['--config', config] + paths)
    assert rc == 0, f'Found {len(errors)} code style errors / warnings:\n' + '\n'.join(errors)
