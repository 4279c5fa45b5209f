"""ament_pep257 docstring checks over the package and its tests."""

import pathlib

from ament_pep257.main import main
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.linter
@pytest.mark.pep257
def test_pep257():
    # The ament convention, but both multi-line summary placements pass (D212 is already off
    # in it; turning D213 off too accepts PEP 257's summary-on-the-first-line form).
    argv = [str(REPO / 'gradclip_ros'), str(REPO / 'test'), '--add-ignore', 'D213']
    assert main(argv=argv) == 0, 'Found docstring style errors'
