"""ROS-free parts of the perception node: rolling statistics, option checks, model fusion."""

import math

import numpy as np
import pytest
import torch

from gradclip_ros.diagnostics import RateMeter, RollingPercentiles
from gradclip_ros.model import build_model, Detector, InferenceSettings, ModelSpec
from gradclip_ros.perception_node import (
    build_detector, check_camera_names, per_camera, prepare_for_inference)

torch.set_num_threads(1)


def test_percentiles_of_known_samples():
    window = RollingPercentiles(capacity=1000)
    for value in range(1, 101):
        window.add(float(value), now=0.0)
    result = window.percentiles((50, 95, 99), now=0.0)
    assert result[50] == pytest.approx(50.5)
    assert result[95] == pytest.approx(95.05)
    assert result[99] == pytest.approx(99.01)


def test_percentiles_keep_newest_samples():
    window = RollingPercentiles(capacity=3)
    for value in (100.0, 1.0, 2.0, 3.0):
        window.add(value, now=0.0)
    assert len(window) == 3
    assert window.values(now=0.0).tolist() == [1.0, 2.0, 3.0]


def test_percentiles_forget_old_samples():
    window = RollingPercentiles(capacity=100, max_age_s=10.0)
    window.add(500.0, now=0.0)
    window.add(5.0, now=8.0)
    assert window.percentiles((50,), now=9.0)[50] == pytest.approx(252.5)
    assert window.percentiles((50,), now=15.0)[50] == 5.0
    assert math.isnan(window.percentiles((50,), now=30.0)[50])


def test_percentiles_reject_bad_limits():
    with pytest.raises(ValueError, match='capacity'):
        RollingPercentiles(capacity=0)
    with pytest.raises(ValueError, match='max_age_s'):
        RollingPercentiles(max_age_s=0.0)


def test_rate_over_window():
    meter = RateMeter(window_s=5.0, start=0.0)
    for step in range(100):
        meter.tick(now=step * 0.1)  # 10 Hz for 10 s
    assert meter.rate(now=10.0) == pytest.approx(10.0, abs=0.3)
    assert meter.total == 100
    assert meter.rate(now=20.0) == 0.0


def test_rate_before_full_window():
    meter = RateMeter(window_s=5.0, start=0.0)
    for step in range(10):
        meter.tick(now=step * 0.1)
    assert meter.rate(now=1.0) == pytest.approx(10.0)


def test_per_camera_expands_one_value():
    assert per_camera(['raw'], ['a', 'b'], 'transports', ('raw', 'compressed')) == ['raw', 'raw']
    assert per_camera(['raw', 'compressed'], ['a', 'b'], 'transports',
                      ('raw', 'compressed')) == ['raw', 'compressed']


def test_per_camera_rejects_bad_values():
    with pytest.raises(ValueError, match='has 2 entries .* for 3 cameras'):
        per_camera(['raw', 'raw'], ['a', 'b', 'c'], 'transports', ('raw', 'compressed'))
    with pytest.raises(ValueError, match="invalid reliability entry 'often'"):
        per_camera(['often'], ['a'], 'reliability', ('best_effort', 'reliable'))


def test_camera_names_checked():
    assert check_camera_names(['front', 'rear/left']) == ['front', 'rear/left']
    with pytest.raises(ValueError, match='empty'):
        check_camera_names([])
    with pytest.raises(ValueError, match="invalid camera name '/front'"):
        check_camera_names(['/front'])


@pytest.mark.parametrize('architecture', ['ssdlite320_mobilenet_v3_large',
                                          'fasterrcnn_mobilenet_v3_large_320_fpn'])
def test_prepared_model_matches_plain(architecture):
    torch.manual_seed(0)
    spec = ModelSpec(architecture=architecture, input_size=160)
    state_dict = build_model(spec).state_dict()
    # Non-trivial batch-norm statistics, so that a wrong fusion changes the output.
    generator = torch.Generator().manual_seed(1)
    for name, tensor in state_dict.items():
        if name.endswith('running_mean'):
            tensor.normal_(0.0, 0.1, generator=generator)
        elif name.endswith('running_var'):
            tensor.uniform_(0.5, 2.0, generator=generator)
    settings = InferenceSettings(score_threshold=0.0, max_detections=20)
    plain = Detector(spec, 'cpu', settings=settings, state_dict=state_dict)
    prepared = build_detector(spec, 'cpu', False, settings, state_dict)

    def norms(detector):
        return sum(type(module) is torch.nn.BatchNorm2d for module in detector.model.modules())
    assert norms(plain) > 0
    assert norms(prepared) == 0

    image = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    first, second = plain.predict([image])[0], prepared.predict([image])[0]
    assert len(first) == len(second) > 0

    # Random weights give many equal scores whose order is arbitrary, so compare sorted rows.
    def rows(detections):
        table = np.column_stack([detections.scores, detections.boxes]).round(2)
        return table[np.lexsort(table.T[::-1])]
    np.testing.assert_allclose(rows(second), rows(first), atol=0.05)


def test_prepare_needs_eval_mode():
    model = build_model(ModelSpec(input_size=160))
    with pytest.raises(ValueError, match='eval mode'):
        prepare_for_inference(model.train())
