"""``gradclip-ros report RUN_DIR``: plot a training run's JSON-lines logs as PNG files.

Reads ``train_log.jsonl`` (one record per training step) and, when present,
``validation_log.jsonl`` (one record per validation) and writes into RUN_DIR:
``loss.png`` (total loss and its parts), ``grad_norm.png`` (norm before and after clipping,
with the threshold), ``clip_rate.png`` (share of clipped units or elements, rolling clip rate),
``holdout_map.png`` (hold-out mAP@0.5 and mAP@[.5:.95], hand-overs marked), ``samples_per_s.png``
and ``lr.png``. Lines that are not JSON objects are skipped and counted.
"""

import argparse
import json
import pathlib
import sys
from typing import Dict, List, Sequence, Tuple

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

TRAIN_LOG = 'train_log.jsonl'
VALIDATION_LOG = 'validation_log.jsonl'


class ReportError(RuntimeError):
    """A run directory without a usable training log; the message names what is missing."""


def load_jsonl(path) -> Tuple[List[dict], List[str]]:
    """Read a JSON-lines file; returns (records, descriptions of the skipped bad lines)."""
    records, bad = [], []
    with open(path, encoding='utf-8', errors='replace') as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                bad.append(f'line {number}: {error.msg}')
                continue
            if not isinstance(record, dict) or not isinstance(record.get('step'), int):
                bad.append(f'line {number}: not an object with an integer "step"')
                continue
            records.append(record)
    return records, bad


def _series(records: Sequence[dict], key: str) -> Tuple[List[int], List[float]]:
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, (int, float)):
            steps.append(record['step'])
            values.append(float(value))
    return steps, values


def _save(figure, axes, path: pathlib.Path, title: str, ylabel: str) -> pathlib.Path:
    axes.set_title(title)
    axes.set_xlabel('training step')
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_loss(records, out_dir: pathlib.Path) -> pathlib.Path:
    figure, axes = plt.subplots(figsize=(8, 4.5))
    axes.plot(*_series(records, 'loss'), label='loss', linewidth=1.5)
    parts = sorted({key for record in records for key in record
                    if key.startswith('loss_') and key != 'loss'})
    for key in parts:
        axes.plot(*_series(records, key), label=key[len('loss_'):], linewidth=0.8)
    axes.set_yscale('log')
    return _save(figure, axes, out_dir / 'loss.png', 'training loss and its parts', 'loss')


def plot_grad_norm(records, out_dir: pathlib.Path) -> pathlib.Path:
    figure, axes = plt.subplots(figsize=(8, 4.5))
    axes.plot(*_series(records, 'grad_norm_before'), label='before clipping', linewidth=0.8)
    axes.plot(*_series(records, 'grad_norm_after'), label='after clipping', linewidth=0.8)
    axes.plot(*_series(records, 'threshold'), label='threshold', linestyle='--', linewidth=1)
    axes.set_yscale('log')
    return _save(figure, axes, out_dir / 'grad_norm.png', 'global gradient L2 norm', 'norm')


def plot_clip_rate(records, out_dir: pathlib.Path) -> pathlib.Path:
    figure, axes = plt.subplots(figsize=(8, 4.5))
    axes.plot(*_series(records, 'clip_fraction'), label='clipped share of the step',
              linewidth=0.8)
    axes.plot(*_series(records, 'clip_rate'), label='rolling share of clipped steps',
              linewidth=1.2)
    axes.set_ylim(-0.02, 1.02)
    return _save(figure, axes, out_dir / 'clip_rate.png', 'gradient clipping', 'share')


def plot_holdout(validations, out_dir: pathlib.Path) -> pathlib.Path:
    figure, axes = plt.subplots(figsize=(8, 4.5))
    axes.plot(*_series(validations, 'map50'), marker='o', label='candidate mAP@0.5')
    axes.plot(*_series(validations, 'map'), marker='o', label='candidate mAP@[.5:.95]')
    axes.plot(*_series(validations, 'deployed_map50'), linestyle='--',
              label='deployed mAP@0.5 (same hold-out set)')
    handed = [(v['step'], v['map50']) for v in validations
              if v.get('handed_over') or v.get('accepted')]
    if handed:
        axes.scatter(*zip(*handed), marker='*', s=120, color='green', zorder=3,
                     label='accepted')
    axes.set_ylim(-0.02, 1.02)
    return _save(figure, axes, out_dir / 'holdout_map.png', 'hold-out validation', 'mAP')


def plot_simple(records, key: str, out_dir: pathlib.Path, name: str, title: str,
                ylabel: str) -> pathlib.Path:
    figure, axes = plt.subplots(figsize=(8, 4.5))
    axes.plot(*_series(records, key), linewidth=0.8)
    return _save(figure, axes, out_dir / name, title, ylabel)


def make_report(run_dir, out_dir=None) -> Dict[str, object]:
    """Write the PNG plots of ``run_dir``; returns {'plots': paths, 'bad_lines': {...}}.

    Raises ReportError when ``train_log.jsonl`` is missing or contains no valid record.
    """
    run_dir = pathlib.Path(run_dir)
    out_dir = pathlib.Path(out_dir) if out_dir else run_dir
    train_path = run_dir / TRAIN_LOG
    if not train_path.is_file():
        raise ReportError(f'{train_path} not found; is {run_dir} a training run directory?')
    records, bad_train = load_jsonl(train_path)
    if not records:
        raise ReportError(
            f'{train_path} contains no valid training record ({len(bad_train)} bad line(s))')

    validations: List[dict] = []
    bad_validation: List[str] = []
    validation_path = run_dir / VALIDATION_LOG
    if validation_path.is_file():
        validations, bad_validation = load_jsonl(validation_path)

    out_dir.mkdir(parents=True, exist_ok=True)
    plots = [
        plot_loss(records, out_dir),
        plot_grad_norm(records, out_dir),
        plot_clip_rate(records, out_dir),
        plot_simple(records, 'samples_per_s', out_dir, 'samples_per_s.png',
                    'training throughput (compute time only)', 'samples / s'),
        plot_simple(records, 'lr', out_dir, 'lr.png', 'learning rate', 'lr'),
    ]
    if validations:
        plots.append(plot_holdout(validations, out_dir))
    return {'plots': plots, 'steps': len(records), 'validations': len(validations),
            'bad_lines': {TRAIN_LOG: bad_train, VALIDATION_LOG: bad_validation}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('run_dir', metavar='RUN_DIR',
                        help='folder with train_log.jsonl (and validation_log.jsonl)')
    parser.add_argument('--out', help='folder for the PNG files (default: RUN_DIR)')


def main(args, stream=None) -> int:
    stream = stream or sys.stdout
    try:
        result = make_report(args.run_dir, args.out)
    except (ReportError, OSError) as error:
        print(f'gradclip-ros report: {error}', file=sys.stderr)
        return 1
    for name, bad in result['bad_lines'].items():
        if bad:
            print(f'gradclip-ros report: skipped {len(bad)} bad line(s) in {name}; first: '
                  f'{bad[0]}', file=sys.stderr)
    print(f'{result["steps"]} steps, {result["validations"]} validations; wrote:', file=stream)
    for path in result['plots']:
        print(f'  {path}', file=stream)
    return 0
