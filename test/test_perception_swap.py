"""perception_node weight hot-swap over real Fast DDS, with good and bad checkpoint files.

Version v2 is the fitted one-box checkpoint (see test_perception_node.py) with the vehicle and
pedestrian outputs of the classification head exchanged, so every answer shows which weights
produced it: 'vehicle' from v1, 'pedestrian' from v2.
"""

import os
import re

import cv2
import numpy as np
import pytest
from std_msgs.msg import String
from test_perception_node import (
    Client, detection_boxes, FIT_INPUT_SIZE, image_message, start_node, status_values,
    write_fitted_checkpoint)
import torch

from gradclip_ros.checkpoints import load_checkpoint, save_checkpoint
from gradclip_ros.model import Detector, ModelSpec
from gradclip_ros.perception_node import resolve_update_path

torch.set_num_threads(1)

MODEL_STATUS = 'perception_node: model'


def exchange_classes(state_dict, first=1, second=2):
    """Return a copy whose SSDlite head predicts class ``first`` as ``second`` and back.

    Indices count the background as 0. The last convolution of each classification head has
    anchors * classes output channels, grouped by anchor.
    """
    result = dict(state_dict)
    num_classes = len(ModelSpec().class_names) + 1
    for name, tensor in state_dict.items():
        if re.fullmatch(r'head\.classification_head\.module_list\.\d+\.1\.(weight|bias)', name):
            grouped = tensor.clone().reshape(-1, num_classes, *tensor.shape[1:])
            grouped[:, [first, second]] = grouped[:, [second, first]]
            result[name] = grouped.reshape(tensor.shape)
    return result


@pytest.fixture(scope='module')
def models(tmp_path_factory, shared_data):
    """Write a model_dir with v1, v2 and bad files, plus a valid file outside it."""
    root = tmp_path_factory.mktemp('swap')
    model_dir = root / 'models'
    outside = root / 'outside'
    model_dir.mkdir()
    outside.mkdir()
    v1, rgb, box = write_fitted_checkpoint(model_dir / 'v1.safetensors', shared_data)
    state_dict, spec, _ = load_checkpoint(v1)

    files = {'v1': v1, 'rgb': rgb, 'box': box, 'model_dir': model_dir}
    files['v2'] = save_checkpoint(model_dir / 'v2.safetensors', exchange_classes(state_dict),
                                  spec.with_version('v2'))
    files['outside'] = save_checkpoint(outside / 'v3.safetensors', state_dict,
                                       spec.with_version('v3'))
    files['wrong_classes'] = save_checkpoint(
        model_dir / 'wrong_classes.safetensors', state_dict,
        ModelSpec(class_names=('car', 'person', 'bike', 'light'), input_size=FIT_INPUT_SIZE,
                  version='v4'))
    nan_state = dict(state_dict)
    name = next(key for key in nan_state if key.endswith('.weight'))
    nan_state[name] = torch.full_like(nan_state[name], float('nan'))
    files['nan'] = save_checkpoint(model_dir / 'nan.safetensors', nan_state,
                                   spec.with_version('v5'))
    missing = {key: value for key, value in state_dict.items()
               if not key.startswith('head.regression_head.')}
    files['missing'] = save_checkpoint(model_dir / 'missing.safetensors', missing,
                                       spec.with_version('v6'))
    corrupt = model_dir / 'corrupt.safetensors'
    corrupt.write_bytes(files['v2'].read_bytes()[:5000])
    files['corrupt'] = corrupt
    link = model_dir / 'link.safetensors'
    os.symlink(files['outside'], link)
    files['link'] = link
    files['dotdot'] = model_dir / '..' / 'outside' / 'v3.safetensors'
    return files


def model_values(client):
    return status_values(client.fresh_diagnostics(), MODEL_STATUS)[2]


def wait_model_value(client, key, value, what):
    """Wait until the model status has ``key`` == ``value``; return (level, values)."""
    def check():
        if not client.diagnostics:
            return None
        level, _, values = status_values(client.diagnostics[-1], MODEL_STATUS)
        return (level, values) if values[key] == value else None
    return client.wait_for(check, what)


def top_class(answer):
    found = detection_boxes(answer)
    assert found, 'no detection in the answer'
    return max(found, key=lambda item: item[1])[0]


def test_swap_while_streaming(models):
    node = start_node(
        checkpoint=str(models['v1']), input_size=FIT_INPUT_SIZE, device='cpu', torch_threads=1,
        cameras=['front'], reliability=['reliable'], model_dir=str(models['model_dir']),
        diagnostics_period=0.2)
    client = Client(['front'], ['raw'], name='swap_test_client')
    try:
        client.wait_connected(['front'])
        frame = image_message(cv2.resize(models['rgb'], (640, 480),
                                         interpolation=cv2.INTER_AREA))
        assert model_values(client)['version'] == 'v1'

        # Stream frames one after the other and request the swap in the middle. Each frame
        # is sent once its predecessor is answered, so a lost frame shows up as a timeout.
        classes = [top_class(client.send('front', frame)) for _ in range(3)]
        client.updates.publish(String(data=str(models['v2'])))
        swapped_at = None
        for _ in range(400):
            classes.append(top_class(client.send('front', frame)))
            if swapped_at is None and classes[-1] == 'pedestrian':
                swapped_at = len(classes) - 1
            if swapped_at is not None and len(classes) >= swapped_at + 5:
                break
        assert swapped_at is not None, 'v2 never answered'
        assert set(classes[:swapped_at]) == {'vehicle'}
        assert set(classes[swapped_at:]) == {'pedestrian'}

        values = model_values(client)
        assert values['version'] == 'v2'
        assert values['swaps_done'] == '1'
        assert values['swaps_refused'] == '0'
        assert values['weights_source'] == os.path.realpath(models['v2'])

        # Every bad update is rejected while v2 keeps answering.
        bad = ['corrupt', 'outside', 'wrong_classes', 'nan', 'missing', 'link', 'dotdot']
        reasons = {}
        for refused, kind in enumerate(bad, start=1):
            client.updates.publish(String(data=str(models[kind])))
            _, values = wait_model_value(client, 'swaps_refused', str(refused),
                                         f'the {kind} update to be rejected')
            reasons[kind] = values['last_rejection']
            assert values['version'] == 'v2', kind
            assert top_class(client.send('front', frame)) == 'pedestrian', kind
        assert 'cannot read checkpoint' in reasons['corrupt']
        assert 'outside model_dir' in reasons['outside']
        assert 'class_names' in reasons['wrong_classes']
        assert 'NaN' in reasons['nan']
        assert 'missing' in reasons['missing']
        assert 'outside model_dir' in reasons['link']
        assert 'outside model_dir' in reasons['dotdot']
        assert model_values(client)['swaps_done'] == '1'
    finally:
        client.close()
        node.close()


def test_late_joiner_gets_latest_update(models):
    # The update is latched (transient local), so a node started afterwards still gets it.
    client = Client(['front'], ['raw'], name='late_join_client')
    node = None
    try:
        client.updates.publish(String(data=str(models['v2'])))
        node = start_node(
            input_size=FIT_INPUT_SIZE, device='cpu', torch_threads=1, cameras=['front'],
            reliability=['reliable'], model_dir=str(models['model_dir']),
            diagnostics_period=0.2)
        level, values = wait_model_value(client, 'version', 'v2',
                                         'the latched update to be swapped in')
        assert values['weights_source'] == os.path.realpath(models['v2'])
        assert level == 0  # OK once real weights serve
    finally:
        if node is not None:
            node.close()
        client.close()


def test_random_init_and_empty_model_dir(models):
    node = start_node(
        input_size=FIT_INPUT_SIZE, device='cpu', torch_threads=1, cameras=['front'],
        silence_timeout=0.3, diagnostics_period=0.2)
    client = Client(['front'], ['raw'], name='random_init_client')
    try:
        level, message, values = status_values(client.fresh_diagnostics(), MODEL_STATUS)
        assert values['weights_source'] == 'random-init'
        assert values['version'] == 'random-init'
        assert level == 1  # WARN
        assert 'random weights' in message

        client.updates.publish(String(data=str(models['v2'])))
        _, values = wait_model_value(client, 'swaps_refused', '1', 'the update to be rejected')
        assert 'model_dir is empty' in values['last_rejection']
        assert values['version'] == 'random-init'

        # No frame ever arrived, so the camera reports WARN once silence_timeout passes.
        level, message, values = status_values(client.fresh_diagnostics(),
                                               'perception_node: camera front')
        assert level == 1
        assert 'no frame' in message
        assert values['seconds_since_last_frame'] == 'never'
    finally:
        client.close()
        node.close()


@pytest.mark.parametrize('path, reason', [
    ('{outside}/v3.safetensors', 'outside model_dir'),
    ('{model_dir}/../outside/v3.safetensors', 'outside model_dir'),
    ('../outside/v3.safetensors', 'outside model_dir'),
    ('{model_dir}/link.safetensors', 'outside model_dir'),
    ('{model_dir}/absent.safetensors', 'not a file'),
    ('{model_dir}', 'outside model_dir'),
    ('', 'empty path'),
])
def test_update_path_containment(models, path, reason):
    model_dir = str(models['model_dir'])
    outside = str(models['outside'].parent)
    with pytest.raises(ValueError, match=reason):
        resolve_update_path(path.format(model_dir=model_dir, outside=outside), model_dir)


def test_update_path_inside_accepted(models):
    model_dir = str(models['model_dir'])
    expected = os.path.realpath(models['v2'])
    assert resolve_update_path(str(models['v2']), model_dir) == expected
    assert resolve_update_path('v2.safetensors', model_dir) == expected
    assert resolve_update_path(f'{model_dir}/./sub/../v2.safetensors', model_dir) == expected


def test_exchange_classes_changes_top_class(models):
    # Guards the premise of the swap test: v2 labels the fitted vehicle as a pedestrian.
    state_dict, spec, _ = load_checkpoint(models['v2'])
    found = Detector(spec, 'cpu', state_dict=state_dict).predict([models['rgb']])[0]
    assert len(found) >= 1
    assert spec.class_names[int(found.labels[np.argmax(found.scores)])] == 'pedestrian'
