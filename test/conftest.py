"""Shared pytest set-up: a private ROS domain per test session and paths to the real data."""

import fcntl
import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'

# Fast DDS on Linux supports domain ids 0..232; 1..100 leaves room for other tools' defaults.
_DOMAIN_RANGE = range(1, 101)
_domain_lock = None


def _claim_domain_id() -> int:
    """Lock the first free domain id on this machine so parallel test runs never cross-talk."""
    global _domain_lock
    start = os.getpid() % len(_DOMAIN_RANGE)
    for offset in range(len(_DOMAIN_RANGE)):
        domain = _DOMAIN_RANGE[(start + offset) % len(_DOMAIN_RANGE)]
        handle = open(f'/tmp/gradclip_ros_domain_{domain}.lock', 'w')
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        _domain_lock = handle  # held until this process exits
        return domain
    raise RuntimeError('all ROS domain ids 1..100 are locked by other test runs')


def pytest_configure(config):
    # Set before any test imports rclpy; child processes inherit the same private domain.
    if 'GRADCLIP_TEST_DOMAIN_ID' not in os.environ:
        os.environ['GRADCLIP_TEST_DOMAIN_ID'] = str(_claim_domain_id())
    os.environ['ROS_DOMAIN_ID'] = os.environ['GRADCLIP_TEST_DOMAIN_ID']
    os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    os.environ['ROS_LOCALHOST_ONLY'] = '1'
    config.addinivalue_line('markers', 'slow: long end-to-end test')


@pytest.fixture(scope='session')
def shared_data() -> pathlib.Path:
    """Return the read-only real data folder beside the checkout; skip when it is missing."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f'real data folder not found: {SHARED_DATA}')
    return SHARED_DATA
