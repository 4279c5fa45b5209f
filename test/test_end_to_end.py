"""The demo flow, shortened: real frames replayed through both nodes over Fast DDS.

The demo driver converts the labeled Apollo frames into a bag, starts perception_node and
online_learner_node as child processes and replays the bag in a loop. It stops once the
perception node serves handed-over weights with a clearly better hold-out mAP@0.5, or when its
time budget runs out. The summary it writes is checked here.
"""

import json
import os
import subprocess
import sys

import pytest

# Node time budget. It stops earlier once the target is reached (about 70 s on an idle
# 2-core machine); conversion, start-up and the final report add about half a minute.
BUDGET_S = 240
TARGET_MAP50 = 0.3


@pytest.mark.slow
def test_demo_flow_improves_served_model(shared_data, tmp_path):
    run_dir = tmp_path / 'run'
    command = [
        sys.executable, '-m', 'gradclip_ros.demo', '--run-dir', str(run_dir),
        '--budget', str(BUDGET_S), '--target-map50', str(TARGET_MAP50),
        '--resize', '640x360', '--no-progress',
        '--set', 'online_learner_node:validate_every:=25',
        '--set', 'online_learner_node:max_duty_cycle:=1.0',
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=BUDGET_S + 120,
                            env=os.environ.copy())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(run_dir)

    summary = json.loads((run_dir / 'summary.json').read_text())

    # Detections arrived on every camera, carrying the replayed images' headers.
    assert set(summary['cameras']) == {'narrow', 'obstacle'}
    for camera, detail in summary['cameras'].items():
        assert detail['detection_messages'] > 0, f'no detections on {camera}'
        assert detail['stamps_not_in_bag'] == 0, f'{camera}: detection stamps not from the bag'
        assert detail['frame_ids'] == detail['bag_frame_ids'], camera
    assert summary['frames_processed'] > 0
    assert summary['latency_p50_ms'] is not None and summary['latency_p50_ms'] > 0

    # Training ran with clipping statistics published per step.
    assert summary['train_steps'] > 0
    assert summary['steps_clipped'] > 0
    assert summary['training_stats_messages'] > 0
    for key in ('grad_norm_before', 'grad_norm_after', 'threshold', 'clipped', 'loss'):
        assert key in summary['training_stats_keys'], key

    # A checkpoint was handed over and perception picked it up.
    assert summary['checkpoints_handed_over'] >= 1
    assert summary['final_model_version'].startswith('step-'), summary['final_model_version']

    # The served model is clearly better on the learner's hold-out frames than the start.
    assert summary['map50_start'] is not None and summary['map50_end'] is not None
    assert summary['map50_end'] >= summary['map50_start'] + 0.2, summary

    assert (run_dir / 'train_log.jsonl').stat().st_size > 0
    assert summary['annotated_frames'], 'no annotated before/after frames'
    assert summary['plots'], 'no report plots'
