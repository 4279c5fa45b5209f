"""Tests of ``gradclip-ros report``: plots from JSON-lines logs, bad lines skipped and counted."""

import argparse
import json

from gradclip_ros import report


def write_logs(run_dir, steps: int = 30, bad_lines=()):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, steps + 1):
        lines.append(json.dumps({
            'step': step, 'loss': 10.0 / step, 'loss_classification': 6.0 / step,
            'loss_bbox_regression': 4.0 / step, 'lr': 0.05, 'grad_norm_before': 50.0 / step,
            'grad_norm_after': min(50.0 / step, 5.0), 'threshold': 0.001, 'clipped': step < 10,
            'clip_fraction': 0.5 if step < 10 else 0.0, 'clip_rate': 0.3,
            'nonfinite_count': 0, 'skipped': '', 'spike': False, 'samples_per_s': 9.5}))
    lines[5:5] = list(bad_lines)
    (run_dir / 'train_log.jsonl').write_text('\n'.join(lines) + '\n')
    validations = [
        {'step': 10, 'map50': 0.1, 'map': 0.05, 'deployed_map50': 0.0, 'accepted': True,
         'handed_over': '/tmp/x.safetensors'},
        {'step': 20, 'map50': 0.05, 'map': 0.02, 'deployed_map50': 0.1, 'accepted': False,
         'handed_over': None},
    ]
    (run_dir / 'validation_log.jsonl').write_text(
        '\n'.join(json.dumps(v) for v in validations) + '\n')


def run_report(*argv) -> int:
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    return report.main(parser.parse_args([str(arg) for arg in argv]))


def test_report_writes_every_plot(tmp_path, capsys):
    write_logs(tmp_path)
    assert run_report(tmp_path) == 0
    output = capsys.readouterr().out
    assert '30 steps, 2 validations' in output
    for name in ('loss.png', 'grad_norm.png', 'clip_rate.png', 'holdout_map.png',
                 'samples_per_s.png', 'lr.png'):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b'\x89PNG'), name
        assert len(data) > 5000, name


def test_report_skips_and_counts_bad_lines(tmp_path, capsys):
    write_logs(tmp_path, bad_lines=['{"step": 3, "loss": ', 'not json', '[1, 2]',
                                    '{"loss": 1.0}'])
    assert run_report(tmp_path) == 0
    captured = capsys.readouterr()
    assert 'skipped 4 bad line(s) in train_log.jsonl' in captured.err
    assert '30 steps' in captured.out
    records, bad = report.load_jsonl(tmp_path / 'train_log.jsonl')
    assert len(records) == 30
    assert len(bad) == 4
    assert bad[0].startswith('line 6:')


def test_report_missing_log(tmp_path, capsys):
    assert run_report(tmp_path / 'nothing') == 1
    assert 'train_log.jsonl not found' in capsys.readouterr().err


def test_report_empty_log(tmp_path, capsys):
    (tmp_path / 'train_log.jsonl').write_text('')
    assert run_report(tmp_path) == 1
    assert 'no valid training record' in capsys.readouterr().err


def test_report_without_validation_log(tmp_path, capsys):
    write_logs(tmp_path)
    (tmp_path / 'validation_log.jsonl').unlink()
    out_dir = tmp_path / 'plots'
    assert run_report(tmp_path, '--out', out_dir) == 0
    assert (out_dir / 'loss.png').is_file()
    assert not (out_dir / 'holdout_map.png').exists()
