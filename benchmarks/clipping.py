"""Speed of every clipping mode on the parameters of the project's default detector.

The detector is SSDlite320-MobileNetV3-Large with 5 classes (4 plus background), built
without pretrained weights so nothing is downloaded. Its gradients are random (seeded) and
reset before every timed call, outside the timing, so every mode really clips each time.
Measured, as medians over interleaved repetitions after a warm-up:

- ``<mode>_vs_torch``: time of ``GradientClipper.clip()`` in that mode over the time of
  ``torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)`` in the same run
  (targets: norm <= 1.10, every other mode <= 2.0).
- ``max_share_of_step``: the slowest mode's time over one training step of the detector at
  batch 4 and 320x320 (forward with targets, backward, SGD step; target <= 0.05).
- ``unitwise_loop_speedup``: a per-tensor Python-loop implementation of unitwise clipping,
  as common open-source code writes it, over this engine's unitwise mode.
- ``value_torch_ops_vs_torch``, ``relative_torch_ops_vs_torch`` and
  ``unitwise_torch_ops_vs_torch``: those modes with ``cpu_kernel: false``, i.e. torch ops
  instead of the fused CPU kernel (``gradclip_ros.clip_kernel``) that their plain rows use.

Run: ``python benchmarks/clipping.py [--json] [--repeats N] [--device cpu|cuda]
[--threads N]``. The default of one intra-op thread keeps the numbers stable on a machine
shared with other jobs; pass ``--threads`` to measure more.
"""

import argparse
import functools
import json
import statistics
import sys
import time

import torch
import torchvision

from gradclip_ros import clip_kernel
from gradclip_ros.clipping import GradientClipper, MODES

# Thresholds chosen so that every mode clips on the random gradients below.
MODE_SETTINGS = {
    'value': {'abs_tol': 2e-3},
    'norm': {'max_norm': 1.0},
    'relative': {'abs_tol': 1e-3, 'rel_tol': 0.05},
    'unitwise': {'abs_tol': 1e-3, 'rel_tol': 0.01},
    'percentile': {'percentile': 90.0, 'window': 1000, 'warmup': 25},
    'zscore': {'z_max': 2.5, 'alpha': 0.97, 'warmup': 25},
}
KERNEL_MODES = ('value', 'relative', 'unitwise')
GRAD_SCALE = 1e-2  # standard deviation of the random gradient elements
MAX_NORM = 1.0


def build_detector(device: torch.device) -> torch.nn.Module:
    """Return the default detector with random weights, in training mode, on ``device``."""
    torch.manual_seed(0)
    model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=5)
    return model.to(device).train()


def adaptive_history(mode: str, norm: float) -> dict:
    """Return a clipper state whose history makes ``norm`` a clear outlier, so it is clipped."""
    state = {'format': 1, 'mode': mode, 'step': 1000, 'clip_history': [],
             'norm_history': [], 'warmup_norms': [], 'ema_mean': None, 'ema_var': None}
    if mode == 'percentile':
        state['norm_history'] = [norm * (0.2 + 0.3 * index / 999) for index in range(1000)]
    else:
        state['ema_mean'] = 0.3 * norm
        state['ema_var'] = (0.05 * norm) ** 2
    return state


def loop_unitwise(named_params, abs_tol: float, rel_tol: float, eps: float = 1e-3) -> None:
    """Unitwise clipping written as a per-tensor Python loop, the common open-source way."""
    for _, param in named_params:
        grad = param.grad
        if grad is None:
            continue
        if param.dim() >= 2:
            dims = tuple(range(1, param.dim()))
            weight_norm = param.detach().norm(2.0, dim=dims, keepdim=True)
            grad_norm = grad.norm(2.0, dim=dims, keepdim=True)
        else:
            weight_norm = param.detach().norm(2.0)
            grad_norm = grad.norm(2.0)
        bound = (weight_norm.clamp(min=eps) * rel_tol).clamp(min=abs_tol)
        clipped = grad * (bound / grad_norm.clamp(min=1e-6))
        grad.copy_(torch.where(grad_norm > bound, clipped, grad))


def time_call(function, prepare, device: torch.device) -> float:
    """Run ``prepare()`` untimed, then time ``function()`` and return its seconds."""
    prepare()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    function()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure_clipping(model: torch.nn.Module, repeats: int, device: torch.device) -> dict:
    """Return the median seconds per call of torch's norm clipping, each mode and the loop."""
    generator = torch.Generator(device='cpu').manual_seed(1)
    params = [param for param in model.parameters() if param.requires_grad]
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    base = [(torch.randn(param.shape, generator=generator) * GRAD_SCALE).to(device)
            for param in params]
    for param in params:
        param.grad = torch.empty_like(param)
    grads = [param.grad for param in params]

    def reset_grads():
        torch._foreach_copy_(grads, base)

    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(base))).item()
    clippers = {}
    for mode in MODES:
        clippers[mode] = GradientClipper(named, {'mode': mode, **MODE_SETTINGS[mode]})
    # The same modes without the fused kernel, to show what the kernel gains.
    for mode in KERNEL_MODES:
        clippers[f'{mode}_torch_ops'] = GradientClipper(
            named, {'mode': mode, **MODE_SETTINGS[mode], 'cpu_kernel': False})

    candidates = {'torch_norm': (
        lambda: torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True), reset_grads)}

    def reset_grads_and_history(clipper, state):
        reset_grads()
        clipper.load_state_dict(state)

    for mode, clipper in clippers.items():
        prepare = reset_grads
        if mode in ('percentile', 'zscore'):
            prepare = functools.partial(reset_grads_and_history, clipper,
                                        adaptive_history(mode, norm))
        candidates[mode] = (clipper.clip, prepare)
    settings = MODE_SETTINGS['unitwise']
    candidates['unitwise_loop'] = (
        lambda: loop_unitwise(named, settings['abs_tol'], settings['rel_tol']), reset_grads)

    for mode, clipper in clippers.items():
        candidates[mode][1]()
        stats = clipper.clip()
        if not stats.clipped:
            raise RuntimeError(f'benchmark settings do not make mode {mode} clip: {stats}')

    # Warm up, then interleave so that load from other processes hits every candidate alike.
    for function, prepare in candidates.values():
        for _ in range(5):
            time_call(function, prepare, device)
    samples = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, (function, prepare) in candidates.items():
            samples[name].append(time_call(function, prepare, device))
    return {name: statistics.median(values) for name, values in samples.items()}


def synthetic_batch(batch: int, side: int, device: torch.device, generator: torch.Generator):
    """Return random images [B, 3, side, side] in [0, 1] and one or two boxes per image."""
    images = torch.rand(batch, 3, side, side, generator=generator).to(device)
    targets = []
    for index in range(batch):
        count = 1 + index % 2
        corner = torch.rand(count, 2, generator=generator) * side * 0.6
        size = 16 + torch.rand(count, 2, generator=generator) * side * 0.3
        boxes = torch.cat([corner, (corner + size).clamp(max=side - 1)], dim=1)
        labels = torch.randint(1, 5, (count,), generator=generator)
        targets.append({'boxes': boxes.to(device), 'labels': labels.to(device)})
    return images, targets


def measure_training_step(model: torch.nn.Module, repeats: int, device: torch.device) -> float:
    """Return the median seconds of one SGD training step at batch 4 and 320x320."""
    generator = torch.Generator(device='cpu').manual_seed(2)
    images, targets = synthetic_batch(4, 320, device, generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        losses = model(list(images), targets)
        sum(losses.values()).backward()
        optimizer.step()

    step()
    times = [time_call(step, lambda: None, device) for _ in range(repeats)]
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--json', action='store_true',
                        help='print exactly one JSON object instead of the table')
    parser.add_argument('--repeats', type=int, default=200,
                        help='timed calls per candidate (default 200)')
    parser.add_argument('--step-repeats', type=int, default=5,
                        help='timed training steps (default 5)')
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cpu',
                        help='device of the model and gradients (default cpu)')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch intra-op threads (default 1)')
    args = parser.parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda requested, but CUDA is not available')
    if args.repeats < 1 or args.step_repeats < 1 or args.threads < 1:
        parser.error('--repeats, --step-repeats and --threads must be >= 1')

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_detector(device)
    clip_seconds = measure_clipping(model, args.repeats, device)
    step_seconds = measure_training_step(model, args.step_repeats, device)

    torch_seconds = clip_seconds['torch_norm']
    result = {f'{mode}_vs_torch': clip_seconds[mode] / torch_seconds for mode in MODES}
    for mode in KERNEL_MODES:
        result[f'{mode}_torch_ops_vs_torch'] = clip_seconds[f'{mode}_torch_ops'] / torch_seconds
    slowest = max(clip_seconds[mode] for mode in MODES)
    result['max_share_of_step'] = slowest / step_seconds
    result['unitwise_loop_speedup'] = clip_seconds['unitwise_loop'] / clip_seconds['unitwise']
    result['median_ms'] = {name: seconds * 1e3 for name, seconds in clip_seconds.items()}
    result['median_ms']['training_step'] = step_seconds * 1e3
    params = [param for param in model.parameters() if param.requires_grad]
    result['setup'] = {
        'device': args.device,
        'threads': torch.get_num_threads(),
        'repeats': args.repeats,
        'parameter_tensors': len(params),
        'parameter_elements': sum(param.numel() for param in params),
        'torch': torch.__version__,
        'fused_kernel': args.device == 'cpu' and clip_kernel.load() is not None,
    }

    if args.json:
        print(json.dumps(result))
        return 0
    setup = result['setup']
    print(f"SSDlite320-MobileNetV3 ({setup['parameter_tensors']} tensors, "
          f"{setup['parameter_elements']} elements), device {setup['device']}, "
          f"{setup['threads']} thread(s), {args.repeats} repeats, torch {setup['torch']}, "
          f"fused kernel {'on' if setup['fused_kernel'] else 'off'}")
    print(f"{'candidate':<20}{'median ms':>11}{'vs torch norm':>15}")
    for name, seconds in clip_seconds.items():
        print(f'{name:<20}{seconds * 1e3:>11.3f}{seconds / torch_seconds:>15.2f}')
    print(f"{'training step':<20}{step_seconds * 1e3:>11.1f}")
    print(f"max share of step {result['max_share_of_step']:.4f}, "
          f"unitwise loop speed-up {result['unitwise_loop_speedup']:.1f}x")
    return 0


if __name__ == '__main__':
    sys.exit(main())
