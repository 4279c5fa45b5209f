"""Tests of the ROS-free image/labels pairing and of the box-by-box label validator."""

import math

import numpy as np
import pytest

from gradclip_ros.label_validation import BAD_LABEL_KINDS, validate_boxes
from gradclip_ros.pairing import StampPairer

MS = 1_000_000  # nanoseconds per millisecond


class FakeClock:
    """A settable monotonic clock in nanoseconds, so expiry needs no sleeping."""

    def __init__(self):
        self.now_ns = 0

    def __call__(self) -> int:
        return self.now_ns

    def advance(self, seconds: float) -> None:
        self.now_ns += int(seconds * 1e9)


def test_exact_stamps_pair():
    pairer = StampPairer(tolerance_s=0.0, max_pending=4, max_wait_s=1.0)
    assert pairer.add_image('front', 100 * MS, 'image-100') is None
    pair = pairer.add_labels('front', 100 * MS, 'labels-100')
    assert pair is not None
    assert pair.camera == 'front'
    assert pair.image == 'image-100'
    assert pair.labels == 'labels-100'
    assert pair.image_stamp_ns == pair.labels_stamp_ns == 100 * MS
    assert pairer.pending() == {'image': 0, 'labels': 0}
    assert pairer.counters['pairs'] == 1


def test_within_tolerance_pairs_closest():
    pairer = StampPairer(tolerance_s=0.010, max_pending=4, max_wait_s=1.0)
    pairer.add_image('front', 100 * MS, 'far')
    pairer.add_image('front', 108 * MS, 'near')
    pair = pairer.add_labels('front', 110 * MS, 'labels')
    assert pair.image == 'near'
    assert pair.image_stamp_ns == 108 * MS
    assert pair.labels_stamp_ns == 110 * MS
    assert pairer.pending() == {'image': 1, 'labels': 0}


def test_outside_tolerance_does_not_pair():
    pairer = StampPairer(tolerance_s=0.005, max_pending=4, max_wait_s=1.0)
    pairer.add_image('front', 100 * MS, 'image')
    assert pairer.add_labels('front', 106 * MS, 'labels') is None
    assert pairer.pending() == {'image': 1, 'labels': 1}


def test_out_of_order_arrival():
    pairer = StampPairer(tolerance_s=0.001, max_pending=10, max_wait_s=5.0)
    # Labels arrive first and in reverse order; images in a shuffled order.
    for stamp in (5, 4, 3, 2, 1):
        assert pairer.add_labels('front', stamp * 100 * MS, f'labels-{stamp}') is None
    pairs = [pairer.add_image('front', stamp * 100 * MS, f'image-{stamp}')
             for stamp in (3, 1, 5, 2, 4)]
    assert all(pair is not None for pair in pairs)
    for pair in pairs:
        assert pair.image.split('-')[1] == pair.labels.split('-')[1]
    assert pairer.pending() == {'image': 0, 'labels': 0}


def test_expiry_counts_both_kinds():
    clock = FakeClock()
    pairer = StampPairer(tolerance_s=0.001, max_pending=10, max_wait_s=0.5, clock_ns=clock)
    pairer.add_image('front', 1 * MS, 'image')
    pairer.add_labels('front', 900 * MS, 'labels')
    clock.advance(0.4)
    assert pairer.expire() == 0
    clock.advance(0.2)
    assert pairer.expire() == 2
    assert pairer.counters['expired_image'] == 1
    assert pairer.counters['expired_labels'] == 1
    # An expired image no longer pairs with labels that arrive late.
    assert pairer.add_labels('front', 1 * MS, 'late labels') is None


def test_expiry_happens_on_add():
    clock = FakeClock()
    pairer = StampPairer(tolerance_s=0.001, max_pending=10, max_wait_s=0.5, clock_ns=clock)
    pairer.add_image('front', 1 * MS, 'old image')
    clock.advance(1.0)
    assert pairer.add_labels('front', 1 * MS, 'labels') is None
    assert pairer.counters['expired_image'] == 1


def test_cameras_are_independent():
    pairer = StampPairer(tolerance_s=0.01, max_pending=4, max_wait_s=1.0)
    pairer.add_image('front', 100 * MS, 'front image')
    assert pairer.add_labels('rear', 100 * MS, 'rear labels') is None
    pair = pairer.add_image('rear', 100 * MS, 'rear image')
    assert pair.camera == 'rear'
    assert pair.labels == 'rear labels'
    pair = pairer.add_labels('front', 100 * MS, 'front labels')
    assert pair.camera == 'front'
    assert pair.image == 'front image'


def test_buffers_are_bounded():
    pairer = StampPairer(tolerance_s=0.0, max_pending=3, max_wait_s=10.0)
    for index in range(10):
        pairer.add_image('front', index * MS, f'image-{index}')
    assert pairer.pending() == {'image': 3, 'labels': 0}
    assert pairer.counters['overflow_image'] == 7
    # The newest three are kept, the oldest were dropped.
    assert pairer.add_labels('front', 9 * MS, 'labels') is not None
    assert pairer.add_labels('front', 0, 'labels') is None
    assert pairer.counters['overflow_labels'] == 0


@pytest.mark.parametrize('arguments', [
    {'tolerance_s': -0.1}, {'max_pending': 0}, {'max_wait_s': 0.0}])
def test_pairer_rejects_bad_settings(arguments):
    with pytest.raises(ValueError):
        StampPairer(**arguments)


CLASSES = ('vehicle', 'pedestrian')


def test_validator_keeps_good_boxes_as_xyxy():
    boxes, labels, dropped = validate_boxes(
        [('vehicle', 50.0, 40.0, 20.0, 10.0), ('pedestrian', 10.0, 10.0, 4.0, 8.0)],
        CLASSES, width=100, height=80)
    np.testing.assert_allclose(boxes, [[40, 35, 60, 45], [8, 6, 12, 14]])
    assert boxes.dtype == np.float32
    assert labels.tolist() == [0, 1]
    assert labels.dtype == np.int64
    assert sum(dropped.values()) == 0


@pytest.mark.parametrize('raw_box, kind', [
    (('vehicle', math.nan, 40.0, 20.0, 10.0), 'non_finite'),
    (('vehicle', 50.0, 40.0, math.inf, 10.0), 'non_finite'),
    (('truck', 50.0, 40.0, 20.0, 10.0), 'unknown_class'),
    ((None, 50.0, 40.0, 20.0, 10.0), 'unknown_class'),
    (('vehicle', 50.0, 40.0, 0.0, 10.0), 'non_positive_size'),
    (('vehicle', 50.0, 40.0, 20.0, -3.0), 'non_positive_size'),
    (('vehicle', 150.0, 40.0, 20.0, 10.0), 'outside_image'),
    (('vehicle', 50.0, -20.0, 20.0, 10.0), 'outside_image'),
    (('vehicle', 100.4, 40.0, 1.0, 10.0), 'outside_image'),
])
def test_validator_drops_each_bad_kind(raw_box, kind):
    good = ('pedestrian', 10.0, 10.0, 4.0, 8.0)
    boxes, labels, dropped = validate_boxes([good, raw_box, good], CLASSES, 100, 80)
    assert len(boxes) == 2
    assert labels.tolist() == [1, 1]
    assert dropped[kind] == 1
    assert sum(dropped.values()) == 1
    assert kind in BAD_LABEL_KINDS


def test_validator_clips_partly_outside_box():
    boxes, labels, dropped = validate_boxes(
        [('vehicle', 95.0, 5.0, 20.0, 20.0)], CLASSES, width=100, height=80)
    np.testing.assert_allclose(boxes, [[85, 0, 100, 15]])
    assert sum(dropped.values()) == 0


def test_validator_empty_label_set_is_valid():
    boxes, labels, dropped = validate_boxes([], CLASSES, 100, 80)
    assert boxes.shape == (0, 4)
    assert labels.shape == (0,)
    assert sum(dropped.values()) == 0
