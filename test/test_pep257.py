"""ament_pep257 docstring checks over the package."""

import pathlib

from ament_pep257.main import main
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.linter
@pytest.mark.pep257
def test_pep257():
    rc = main(argv=[str(REPO / 'gradclip_ros'), str(REPO / 'test')])
    assert rc == 0, 'Found docstring style errors'
