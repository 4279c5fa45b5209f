"""The fused CPU kernels of modes value, relative and unitwise against torch ops, and fallback."""

import copy
import logging
import math
import os
import subprocess
import sys
import textwrap

from hypothesis import given, settings
import hypothesis.strategies as st
import pytest
import torch

from gradclip_ros import clip_kernel
from gradclip_ros.clipping import GradientClipper

KERNEL_MODES = ('value', 'relative', 'unitwise')
SETTINGS = {
    'value': {'abs_tol': 0.05},
    'relative': {'abs_tol': 1e-3, 'rel_tol': 0.1},
    'unitwise': {'abs_tol': 1e-3, 'rel_tol': 0.05},
}


def random_named(seed, shapes, scale, dtype=torch.float32, missing=()):
    """Return [(name, parameter)] with random weights and gradients, none for ``missing``."""
    generator = torch.Generator().manual_seed(seed)
    named = []
    for index, shape in enumerate(shapes):
        param = torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=dtype))
        grad = torch.randn(shape, generator=generator, dtype=dtype) * scale
        param.grad = None if index in missing else grad
        named.append((f'layer{index}.weight', param))
    return named


def twin(named):
    """Return a deep copy of ``named`` with the same weights and gradients."""
    copies = []
    for name, param in named:
        other = torch.nn.Parameter(param.detach().clone())
        other.grad = None if param.grad is None else param.grad.clone()
        copies.append((name, other))
    return copies


def clip_both(named, settings):
    """Clip ``named`` with the kernel, a copy with torch ops. Return both records and copy."""
    reference = twin(named)
    fused = GradientClipper(named, {**settings, 'cpu_kernel': True})
    plain = GradientClipper(reference, {**settings, 'cpu_kernel': False})
    assert fused._kernel is not None
    assert plain._kernel is None
    return fused.clip(), plain.clip(), reference


def assert_same_result(named, reference, fused, plain, exact=True):
    """Compare two clipped copies; unitwise (``exact`` False) may differ in the last bit."""
    for (name, param), (_, other) in zip(named, reference):
        if param.grad is None:
            assert other.grad is None, name
            continue
        if exact:
            assert torch.equal(param.grad, other.grad), name
        else:
            assert torch.allclose(param.grad, other.grad, rtol=1e-5, atol=0.0), name
    assert fused.clipped == plain.clipped
    assert fused.clip_fraction == plain.clip_fraction
    assert fused.norm_before == pytest.approx(plain.norm_before, rel=1e-5)
    assert fused.norm_after == pytest.approx(plain.norm_after, rel=1e-5, abs=1e-30)
    assert fused.threshold == plain.threshold
    assert [name for name, _ in fused.top_norms] == [name for name, _ in plain.top_norms]


def test_kernel_builds_here():
    # make setup builds it; a clean machine with g++ and ninja compiles it on first use.
    assert clip_kernel.load() is not None, clip_kernel.load_error()


shapes_strategy = st.lists(
    st.one_of(
        st.tuples(st.integers(1, 40)),
        st.tuples(st.integers(1, 5), st.integers(1, 7)),
        st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
    ),
    min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(shapes=shapes_strategy, seed=st.integers(0, 2 ** 31 - 1),
       scale=st.sampled_from([1e-6, 1e-3, 1.0, 1e3]), mode=st.sampled_from(KERNEL_MODES),
       abs_tol=st.floats(1e-4, 1.0), rel_tol=st.floats(0.0, 1.0),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_kernel_matches_torch_ops(shapes, seed, scale, mode, abs_tol, rel_tol, dtype):
    named = random_named(seed, shapes, scale, dtype)
    settings = {'mode': mode, 'abs_tol': abs_tol}
    if mode != 'value':
        settings['rel_tol'] = rel_tol

    fused, plain, reference = clip_both(named, settings)

    assert_same_result(named, reference, fused, plain, exact=mode != 'unitwise')


@pytest.mark.parametrize('mode', KERNEL_MODES)
def test_kernel_matches_with_overrides(mode):
    named = random_named(3, [(8, 3, 3, 3), (8,), (16, 8), (16,), (5,)], 0.3, missing=(3,))
    settings = {'mode': mode, **SETTINGS[mode],
                'overrides': [{'pattern': 'layer1.*', 'abs_tol': 0.5},
                              {'pattern': 'layer2.*', 'abs_tol': 1e-4}]}
    if mode != 'value':
        settings['overrides'][1]['rel_tol'] = 0.01

    fused, plain, reference = clip_both(named, settings)

    assert named[3][1].grad is None
    assert fused.clipped
    assert_same_result(named, reference, fused, plain, exact=mode != 'unitwise')


@pytest.mark.parametrize('mode', ['relative', 'unitwise'])
def test_kernel_takes_channels_last_gradients(mode):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 1)).to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    model(images.to(memory_format=torch.channels_last)).square().sum().backward()
    named = list(model.named_parameters())
    assert named[0][1].grad.is_contiguous(memory_format=torch.channels_last)
    assert not named[0][1].grad.is_contiguous()

    fused, plain, reference = clip_both(named, {'mode': mode, 'abs_tol': 1e-3,
                                                'rel_tol': 0.01})

    assert fused.clipped
    assert fused.clip_fraction == plain.clip_fraction
    assert_same_result(named, reference, fused, plain, exact=mode != 'unitwise')


def test_kernel_rejection_uses_torch_ops(caplog):
    # A channels-last gradient of a contiguous weight is laid out unlike the weight, so the
    # kernel rejects it before writing anything and the torch ops clip instead.
    named = random_named(5, [(4, 3, 2, 2), (4,)], 1.0)
    named[0][1].grad = named[0][1].grad.contiguous(memory_format=torch.channels_last)

    with caplog.at_level(logging.WARNING, logger='gradclip_ros.clipping'):
        fused, plain, reference = clip_both(named, {'mode': 'relative', **SETTINGS['relative']})

    assert 'rejected the gradients' in caplog.text
    assert 'layout' in caplog.text
    assert fused.clipped
    assert_same_result(named, reference, fused, plain)


def test_kernel_rejections_counted_warned_once(caplog):
    named = random_named(5, [(4, 3, 2, 2), (4,)], 1.0)
    named[0][1].grad = named[0][1].grad.contiguous(memory_format=torch.channels_last)
    clipper = GradientClipper(named, {'mode': 'relative', **SETTINGS['relative']})

    with caplog.at_level(logging.WARNING, logger='gradclip_ros.clipping'):
        for _ in range(3):
            clipper.clip()

    assert clipper.kernel_rejections == 3
    assert caplog.text.count('rejected the gradients') == 1


def test_kernel_bumps_the_version_counter():
    named = random_named(1, [(6, 5)], 1.0)
    grad = named[0][1].grad
    version = grad._version

    GradientClipper(named, {'mode': 'value', 'abs_tol': 0.1}).clip()

    assert grad._version > version
    assert grad.abs().max() <= torch.tensor(0.1)


@pytest.mark.parametrize('cpu_kernel', [True, False])
@pytest.mark.parametrize('mode', KERNEL_MODES)
@pytest.mark.parametrize('bad', [math.nan, math.inf, -math.inf])
def test_nonfinite_skip_error_keep_gradients(cpu_kernel, mode, bad):
    named = random_named(2, [(6, 4), (6,), (3, 2, 2, 2)], 1.0)
    named[2][1].grad[1, 0, 0, 1] = bad
    before = [param.grad.clone() for _, param in named]
    settings = {'mode': mode, **SETTINGS[mode], 'cpu_kernel': cpu_kernel}

    stats = GradientClipper(named, settings).clip()
    with pytest.raises(FloatingPointError, match='layer2.weight'):
        GradientClipper(named, {**settings, 'on_nonfinite': 'error'}).clip()

    assert stats.skip_step
    assert stats.nonfinite_names == ['layer2.weight']
    assert not math.isfinite(stats.norm_before)
    for (name, param), old in zip(named, before):
        assert torch.equal(param.grad.nan_to_num(), old.nan_to_num()), name
        assert torch.equal(param.grad.isnan(), old.isnan()), name


@pytest.mark.parametrize('cpu_kernel', [True, False])
@pytest.mark.parametrize('mode', KERNEL_MODES)
def test_nonfinite_zero_policy_clips_the_rest(cpu_kernel, mode):
    named = random_named(4, [(6, 4), (6,), (5,)], 1.0)
    reference = twin(named)
    named[1][1].grad[2] = math.nan
    reference[1][1].grad.zero_()
    settings = {'mode': mode, **SETTINGS[mode], 'cpu_kernel': cpu_kernel,
                'on_nonfinite': 'zero'}

    stats = GradientClipper(named, settings).clip()
    expected = GradientClipper(reference, settings).clip()

    assert stats.nonfinite_names == ['layer1.weight']
    assert not stats.skip_step
    assert stats.clipped
    assert torch.equal(named[1][1].grad, torch.zeros(6))
    for (name, param), (_, other) in zip(named, reference):
        assert torch.equal(param.grad, other.grad), name
    assert stats.clip_fraction == expected.clip_fraction


@pytest.mark.parametrize('cpu_kernel', [True, False])
def test_float32_norm_overflow_is_nonfinite(cpu_kernel):
    # Every element is finite, but the sum of squares (3e40) does not fit in float32.
    named = random_named(6, [(3,), (4,)], 1.0)
    named[0][1].grad = torch.full((3,), 1e20)

    stats = GradientClipper(named, {'mode': 'value', 'abs_tol': 0.1,
                                    'cpu_kernel': cpu_kernel}).clip()

    assert stats.skip_step
    assert stats.nonfinite_names == ['layer0.weight']
    assert named[0][1].grad.tolist() == pytest.approx([1e20] * 3)


def test_at_threshold_not_counted_by_kernel():
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.0, 4.0]))
    param.grad = torch.tensor([0.1, -0.2, 0.05, 0.5])

    stats = GradientClipper([('w', param)], {'mode': 'relative', 'abs_tol': 0.05,
                                             'rel_tol': 0.1}).clip()

    # Bounds 0.1, 0.2, 0.05 (floor) and 0.4: only the last element is outside.
    assert param.grad.tolist() == pytest.approx([0.1, -0.2, 0.05, 0.4])
    assert stats.clip_fraction == 0.25
    assert stats.norm_after == pytest.approx(math.sqrt(0.01 + 0.04 + 0.0025 + 0.16), rel=1e-6)


@pytest.mark.parametrize('mode', ['relative', 'unitwise'])
def test_training_kernel_matches_torch_ops(mode):
    # Twenty SGD steps of a small CNN. Relative gives identical clipped gradients, hence
    # weights; unitwise (the learner's default) stays within float32 rounding.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 5))
    other = copy.deepcopy(model)
    runs = []
    for net, cpu_kernel in ((model, True), (other, False)):
        clipper = GradientClipper(net.named_parameters(),
                                  {'mode': mode, 'abs_tol': 1e-3, 'rel_tol': 0.01,
                                   'cpu_kernel': cpu_kernel})
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
        generator = torch.Generator().manual_seed(1)
        fractions = []
        for _ in range(20):
            optimizer.zero_grad(set_to_none=True)
            net(torch.randn(4, 3, 8, 8, generator=generator)).square().sum().backward()
            fractions.append(clipper.clip().clip_fraction)
            optimizer.step()
        runs.append(fractions)

    assert runs[0] == runs[1]
    assert max(runs[0]) > 0.0
    for param, other_param in zip(model.parameters(), other.parameters()):
        if mode == 'relative':
            assert torch.equal(param, other_param)
        else:
            assert torch.allclose(param, other_param, rtol=1e-4, atol=1e-6)


def test_build_failure_uses_torch_ops(tmp_path):
    # A build folder below a plain file cannot be created, so the build fails in this child
    # process. The clipper must warn once and still clip with torch ops.
    blocker = tmp_path / 'not_a_folder'
    blocker.write_text('x')
    script = textwrap.dedent("""
        import logging
        import torch
        from gradclip_ros import clip_kernel
        from gradclip_ros.clipping import GradientClipper
        logging.basicConfig(level=logging.WARNING)
        param = torch.nn.Parameter(torch.zeros(3))
        param.grad = torch.tensor([0.5, -2.0, 0.1])
        clipper = GradientClipper([('w', param)], {'mode': 'value', 'abs_tol': 0.2})
        stats = clipper.clip()
        print('kernel', clipper._kernel is None, clip_kernel.load_error() is not None)
        print('grad', param.grad.tolist(), stats.clip_fraction)
    """)
    env = dict(os.environ, GRADCLIP_ROS_KERNEL_DIR=str(blocker / 'build'))

    result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True,
                            text=True, timeout=120, check=False)

    assert result.returncode == 0, result.stderr
    assert 'kernel True True' in result.stdout
    assert 'grad [0.20000000298023224, -0.20000000298023224, 0.10000000149011612]' \
        in result.stdout
    assert 'fused clipping kernel unavailable' in result.stderr
    assert result.stderr.count('fused clipping kernel unavailable') == 1


@pytest.mark.parametrize('value', ['yes', 1, None])
def test_cpu_kernel_must_be_bool(value):
    with pytest.raises(ValueError, match=r'ClipConfig\.cpu_kernel: invalid value'):
        GradientClipper(random_named(0, [(3,)], 1.0),
                        {'mode': 'relative', **SETTINGS['relative'], 'cpu_kernel': value})


def test_cpu_kernel_rejected_for_norm_mode():
    with pytest.raises(ValueError, match='"cpu_kernel" is not used by mode "norm"'):
        GradientClipper(random_named(0, [(3,)], 1.0),
                        {'mode': 'norm', 'max_norm': 1.0, 'cpu_kernel': True})


@pytest.mark.parametrize('dtype, cpu_kernel', [(torch.float16, True), (torch.float32, False),
                                               (torch.float32, True)])
def test_value_bound_above_dtype_range(dtype, cpu_kernel):
    # 1e39 does not fit in float32 (nor 1e5 in float16); such a bound changes nothing.
    abs_tol = 1e5 if dtype == torch.float16 else 1e39
    named = random_named(7, [(3, 2), (4,)], 10.0, dtype)
    before = [param.grad.clone() for _, param in named]

    settings = {'mode': 'value', 'abs_tol': abs_tol, 'cpu_kernel': cpu_kernel,
                'overrides': [{'pattern': 'layer1.*', 'abs_tol': 2e39}]}
    stats = GradientClipper(named, settings).clip()

    assert not stats.clipped
    assert stats.threshold == abs_tol
    for (name, param), old in zip(named, before):
        assert torch.equal(param.grad, old), name


@pytest.mark.parametrize('cpu_kernel', [True, False])
def test_relative_nan_bound_uses_abs_tol(cpu_kernel):
    # rel_tol 1e39 is inf in float32, and 0 * inf is NaN; a NaN weight gives a NaN product too.
    weight = torch.nn.Parameter(torch.tensor([0.0, 1.0, math.nan, -2.0]))
    weight.grad = torch.tensor([0.5, -0.5, 0.3, 0.01])

    stats = GradientClipper([('w', weight)], {'mode': 'relative', 'abs_tol': 0.1,
                                              'rel_tol': 1e39, 'cpu_kernel': cpu_kernel}).clip()

    assert weight.grad.tolist() == pytest.approx([0.1, -0.5, 0.1, 0.01])
    assert stats.clip_fraction == 0.5
    assert not stats.skip_step


@pytest.mark.parametrize('mode', ['value', 'relative', 'unitwise'])
def test_sparse_gradient_named_in_error(mode):
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    embedding(torch.tensor([1, 2, 2])).sum().backward()
    settings = {'mode': mode, 'abs_tol': 0.1}
    if mode != 'value':
        settings['rel_tol'] = 0.1
    clipper = GradientClipper(embedding.named_parameters(), settings)

    with pytest.raises(ValueError, match=r'sparse gradient in weight; mode "' + mode):
        clipper.clip()
    assert clipper.state_dict()['step'] == 0


def test_sparse_gradient_norm_mode_clips():
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    embedding(torch.tensor([1, 2, 2])).sum().backward()

    stats = GradientClipper(embedding.named_parameters(), {'mode': 'norm', 'max_norm': 1.0}).clip()

    assert stats.clipped
    assert stats.norm_after == pytest.approx(1.0, rel=1e-5)


def test_inference_gradients_left_unchanged():
    # In-place writes to inference tensors fail outside inference mode, on both paths. The
    # kernel must reject them before it writes any of the other gradients.
    first = torch.nn.Parameter(torch.zeros(3))
    second = torch.nn.Parameter(torch.zeros(3))
    first.grad = torch.full((3,), 5.0)
    with torch.inference_mode():
        second.grad = torch.full((3,), 5.0)

    with pytest.raises(RuntimeError, match='[Ii]nference'):
        GradientClipper([('first', first), ('second', second)],
                        {'mode': 'value', 'abs_tol': 1.0}).clip()

    assert first.grad.tolist() == [5.0, 5.0, 5.0]
    assert second.grad.tolist() == [5.0, 5.0, 5.0]


def test_threshold_beyond_float_range_rejected():
    with pytest.raises(ValueError, match=r'ClipConfig\.abs_tol: invalid value 1000'):
        GradientClipper(random_named(0, [(3,)], 1.0), {'mode': 'value', 'abs_tol': 10 ** 400})


def test_unitwise_kernel_rejects_scattered_units(caplog):
    # A transposed [4, 3] tensor keeps dim 0 innermost, so a unit (a row) is not one block of
    # memory. Element-wise modes take it; unitwise falls back to torch ops.
    weight = torch.nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(1)).t())
    weight.grad = torch.randn(3, 4, generator=torch.Generator().manual_seed(2)).t()
    named = [('w', weight)]

    with caplog.at_level(logging.WARNING, logger='gradclip_ros.clipping'):
        fused, plain, reference = clip_both(named, {'mode': 'unitwise', 'abs_tol': 1e-3,
                                                    'rel_tol': 0.01})

    assert 'dim 0 outermost' in caplog.text
    assert fused.clipped
    assert_same_result(named, reference, fused, plain, exact=False)


@pytest.mark.parametrize('cpu_kernel', [True, False])
def test_unitwise_nonfinite_weight_gets_abs_tol(cpu_kernel):
    # Row 0: NaN weight norm. Row 1: inf * rel_tol 0 is NaN. Both fall back to abs_tol 0.5.
    weight = torch.nn.Parameter(torch.tensor([[math.nan, 1.0], [math.inf, 0.0], [0.1, 0.1]]))
    weight.grad = torch.tensor([[3.0, 4.0], [3.0, 4.0], [0.3, 0.4]])
    settings = {'mode': 'unitwise', 'abs_tol': 0.5, 'rel_tol': 0.0, 'cpu_kernel': cpu_kernel}

    stats = GradientClipper([('w', weight)], settings).clip()

    assert weight.grad[0].tolist() == pytest.approx([0.3, 0.4])
    assert weight.grad[1].tolist() == pytest.approx([0.3, 0.4])
    assert weight.grad[2].tolist() == pytest.approx([0.3, 0.4])
    assert stats.clip_fraction == pytest.approx(2 / 3)


def test_kernel_ignores_size_one_strides(caplog):
    # A 1x1 conv weight in channels-last and its gradient viewed from a flat buffer store the
    # elements in the same order, but torch gives their size-1 dims different strides.
    conv = torch.nn.Conv2d(3, 8, 1).to(memory_format=torch.channels_last)
    flat = torch.randn(24, generator=torch.Generator().manual_seed(3))
    conv.weight.grad = flat.view(8, 3, 1, 1)
    assert conv.weight.stride() != conv.weight.grad.stride()
    named = [('weight', conv.weight)]

    with caplog.at_level(logging.WARNING, logger='gradclip_ros.clipping'):
        fused, plain, reference = clip_both(named, {'mode': 'unitwise', 'abs_tol': 1e-3,
                                                    'rel_tol': 0.01})

    assert 'rejected' not in caplog.text
    assert fused.clipped
    assert_same_result(named, reference, fused, plain, exact=False)


def test_float64_norm_sum_overflow_recomputed():
    # Each norm (1.3e154) is finite, but the sum of their squares overflows float64.
    named = random_named(8, [(1,), (1,)], 1.0, torch.float64)
    for _, param in named:
        param.grad = torch.tensor([1.3e154], dtype=torch.float64)

    for cpu_kernel in (True, False):
        stats = GradientClipper(twin(named), {'mode': 'unitwise', 'abs_tol': 1.0, 'rel_tol': 0.0,
                                              'cpu_kernel': cpu_kernel}).clip()
        assert stats.norm_before == pytest.approx(1.3e154 * math.sqrt(2.0)), cpu_kernel
        assert not stats.skip_step, cpu_kernel
        assert stats.norm_after == pytest.approx(math.sqrt(2.0)), cpu_kernel
