"""Gradient clipping engine: hand-computed values, properties, policies, state and statistics."""

import copy
import json
import math

from hypothesis import given, settings
import hypothesis.strategies as st
import numpy as np
import pytest
import torch

from gradclip_ros.clipping import ClipConfig, ClipStats, GradientClipper, MODES

PROPERTY_SETTINGS = settings(max_examples=50, deadline=None)


def parameter(values, grad=None) -> torch.nn.Parameter:
    param = torch.nn.Parameter(torch.tensor(values, dtype=torch.float32))
    if grad is not None:
        param.grad = torch.tensor(grad, dtype=torch.float32)
    return param


def clone_grads(named):
    return {name: None if param.grad is None else param.grad.clone() for name, param in named}


def random_named(seed: int, shapes, scale: float = 1.0):
    """Return [(name, parameter)] with random weights and gradients of the given shapes."""
    generator = torch.Generator().manual_seed(seed)
    named = []
    for index, shape in enumerate(shapes):
        param = torch.nn.Parameter(torch.randn(shape, generator=generator))
        param.grad = torch.randn(shape, generator=generator) * scale
        named.append((f'layer{index}.weight', param))
    return named


def set_norm(param: torch.nn.Parameter, norm: float) -> None:
    """Give ``param`` a gradient of the given L2 norm (all elements equal)."""
    param.grad = torch.full_like(param, norm / math.sqrt(param.numel()))


def tiny_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 5))


def backward(model: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    model.zero_grad(set_to_none=True)
    model(torch.randn(2, 3, 8, 8, generator=generator)).square().sum().backward()


MODE_SETTINGS = {
    'value': {'abs_tol': 0.05},
    'norm': {'max_norm': 0.5},
    'relative': {'abs_tol': 1e-3, 'rel_tol': 0.1},
    'unitwise': {'abs_tol': 1e-3, 'rel_tol': 0.01},
    'percentile': {'warmup': 2, 'percentile': 50.0},
    'zscore': {'warmup': 2},
}


# --------------------------------------------------------------------------------------------
# Hand-computed values


def test_value_hand_values():
    param = parameter([0.0] * 5, [0.5, -2.0, 1.0, 3.0, 0.0])
    stats = GradientClipper([('w', param)], {'mode': 'value', 'abs_tol': 1.0}).clip()

    # 1.0 sits exactly at the bound: kept, and not counted as clipped.
    assert param.grad.tolist() == [0.5, -1.0, 1.0, 1.0, 0.0]
    assert stats.clip_fraction == pytest.approx(2 / 5)
    assert stats.clipped
    assert stats.norm_before == pytest.approx(math.sqrt(0.25 + 4 + 1 + 9))
    assert stats.norm_after == pytest.approx(math.sqrt(0.25 + 1 + 1 + 1))
    assert stats.threshold == 1.0


def test_value_at_bound_not_clipped():
    param = parameter([0.0, 0.0], [1.0, -1.0])
    stats = GradientClipper([('w', param)], {'mode': 'value', 'abs_tol': 1.0}).clip()

    assert param.grad.tolist() == [1.0, -1.0]
    assert not stats.clipped
    assert stats.clip_fraction == 0.0
    assert stats.norm_after == stats.norm_before


def test_value_matches_clip_grad_value():
    reference = random_named(2, [(4, 3, 3, 3), (4,), (7, 5)])
    named = copy.deepcopy(reference)
    for (_, param), (_, ref) in zip(named, reference):
        param.grad = ref.grad.clone()
    torch.nn.utils.clip_grad_value_([param for _, param in reference], 0.3)
    GradientClipper(named, {'mode': 'value', 'abs_tol': 0.3}).clip()

    for (_, param), (_, ref) in zip(named, reference):
        assert torch.equal(param.grad, ref.grad)


def test_norm_hand_values():
    param = parameter([0.0, 0.0], [3.0, 4.0])
    stats = GradientClipper([('w', param)], {'mode': 'norm', 'max_norm': 1.0}).clip()

    scale = 1.0 / (5.0 + 1e-6)
    assert param.grad.tolist() == pytest.approx([3.0 * scale, 4.0 * scale], rel=1e-6)
    assert stats.norm_before == pytest.approx(5.0)
    assert stats.norm_after == pytest.approx(1.0, rel=1e-5)
    assert stats.clip_fraction == 1.0
    assert stats.threshold == 1.0


def test_norm_at_bound_not_clipped():
    param = parameter([0.0, 0.0], [3.0, 4.0])
    stats = GradientClipper([('w', param)], {'mode': 'norm', 'max_norm': 5.0}).clip()

    assert param.grad.tolist() == [3.0, 4.0]
    assert not stats.clipped
    assert stats.clip_fraction == 0.0


def test_norm_matches_clip_grad_norm():
    reference = random_named(3, [(8, 3, 3, 3), (8,), (10, 8), (10,)])
    named = copy.deepcopy(reference)
    for (_, param), (_, ref) in zip(named, reference):
        param.grad = ref.grad.clone()
    total = torch.nn.utils.clip_grad_norm_([param for _, param in reference], 2.0)
    stats = GradientClipper(named, {'mode': 'norm', 'max_norm': 2.0}).clip()

    assert stats.norm_before == pytest.approx(total.item(), rel=1e-6)
    for (_, param), (_, ref) in zip(named, reference):
        assert torch.equal(param.grad, ref.grad)


def test_relative_hand_values():
    # Bounds: max(0.1, 0.1 * |w|) = [0.1, 0.1, 0.2, 1.0]; the zero weight falls back to abs_tol.
    param = parameter([0.0, 1.0, -2.0, 10.0], [0.05, 0.5, -0.5, 2.0])
    stats = GradientClipper([('w', param)],
                            {'mode': 'relative', 'abs_tol': 0.1, 'rel_tol': 0.1}).clip()

    assert param.grad.tolist() == pytest.approx([0.05, 0.1, -0.2, 1.0])
    assert stats.clip_fraction == pytest.approx(3 / 4)
    assert stats.norm_after == pytest.approx(math.sqrt(0.05 ** 2 + 0.01 + 0.04 + 1.0), rel=1e-6)
    assert stats.abs_tol == 0.1
    assert stats.rel_tol == 0.1


def test_relative_at_bound_not_clipped():
    param = parameter([2.0, -4.0], [0.2, -0.4])
    stats = GradientClipper([('w', param)],
                            {'mode': 'relative', 'abs_tol': 0.0, 'rel_tol': 0.1}).clip()

    assert param.grad.tolist() == pytest.approx([0.2, -0.4])
    assert not stats.clipped


def test_relative_zero_gradients():
    param = parameter([0.0, 3.0], [0.0, 0.0])
    stats = GradientClipper([('w', param)],
                            {'mode': 'relative', 'abs_tol': 0.0, 'rel_tol': 0.1}).clip()

    assert param.grad.tolist() == [0.0, 0.0]
    assert not stats.clipped
    assert stats.norm_before == 0.0


def test_unitwise_conv_units_are_out_channels():
    # Out channel 0 has weights of norm 2, out channel 1 zero weights (eps applies).
    weight = torch.zeros(2, 1, 2, 2)
    weight[0] = 1.0
    param = torch.nn.Parameter(weight)
    grad = torch.empty(2, 1, 2, 2)
    grad[0] = 1.0  # norm 2 > bound 0.5 * 2 = 1
    grad[1] = 1e-4  # norm 2e-4 <= bound 0.5 * 1e-3 = 5e-4
    param.grad = grad.clone()
    stats = GradientClipper([('conv.weight', param)],
                            {'mode': 'unitwise', 'rel_tol': 0.5, 'eps': 1e-3}).clip()

    assert torch.allclose(param.grad[0], torch.full((1, 2, 2), 0.5), rtol=1e-6)
    assert torch.equal(param.grad[1], grad[1])
    assert stats.clip_fraction == pytest.approx(1 / 2)
    assert stats.norm_after == pytest.approx(math.sqrt(1.0 + (2e-4) ** 2), rel=1e-5)


def test_unitwise_zero_weights_use_eps():
    param = parameter([0.0, 0.0, 0.0], [1.0, 0.0, 0.0])
    GradientClipper([('bias', param)], {'mode': 'unitwise', 'rel_tol': 2.0, 'eps': 0.25}).clip()

    # One unit (the whole 1-D tensor), bound 2 * 0.25.
    assert param.grad.tolist() == pytest.approx([0.5, 0.0, 0.0])


def test_unitwise_abs_tol_floor():
    param = parameter([0.0, 0.0], [3.0, 4.0])
    GradientClipper([('bias', param)],
                    {'mode': 'unitwise', 'abs_tol': 1.0, 'rel_tol': 0.01}).clip()

    assert param.grad.tolist() == pytest.approx([0.6, 0.8])


def test_unitwise_at_bound_not_clipped():
    # Binary fractions keep both norms exact: 0.125 * 5 == norm([0.375, 0.5]).
    param = parameter([[3.0, 4.0], [1.0, 0.0]], [[0.375, 0.5], [0.0, 0.0]])
    stats = GradientClipper([('fc.weight', param)],
                            {'mode': 'unitwise', 'rel_tol': 0.125}).clip()

    assert param.grad.tolist() == [[0.375, 0.5], [0.0, 0.0]]
    assert not stats.clipped


def test_unitwise_single_element_parameter():
    param = parameter([2.0], [5.0])
    stats = GradientClipper([('scale', param)], {'mode': 'unitwise', 'rel_tol': 0.5}).clip()

    assert param.grad.tolist() == pytest.approx([1.0])
    assert stats.clip_fraction == 1.0


def test_unitwise_zero_gradients():
    param = parameter([[1.0, 2.0]], [[0.0, 0.0]])
    stats = GradientClipper([('fc.weight', param)], {'mode': 'unitwise', 'rel_tol': 0.1}).clip()

    assert param.grad.tolist() == [[0.0, 0.0]]
    assert not stats.clipped
    assert math.isfinite(stats.norm_after)


def test_unitwise_scalar_parameter():
    param = torch.nn.Parameter(torch.tensor(2.0))
    param.grad = torch.tensor(-3.0)
    GradientClipper([('temperature', param)], {'mode': 'unitwise', 'rel_tol': 0.5}).clip()

    assert param.grad.item() == pytest.approx(-1.0)


def test_unitwise_matches_loop_reference():
    named = random_named(4, [(6, 3, 3, 3), (6,), (6, 1, 3, 3), (5, 24), (5,), (1,)], scale=0.5)
    expected = []
    for _, param in named:
        grad = param.grad.clone()
        rows = grad.view(grad.shape[0], -1) if grad.dim() >= 2 else grad.view(1, -1)
        weights = param.detach().view(rows.shape)
        bound = (weights.norm(dim=1).clamp(min=1e-3) * 0.05).clamp(min=0.01)
        norms = rows.norm(dim=1)
        factor = torch.where(norms > bound, bound / norms, torch.ones_like(norms))
        expected.append((rows * factor[:, None]).view_as(grad))
    GradientClipper(named, {'mode': 'unitwise', 'abs_tol': 0.01, 'rel_tol': 0.05}).clip()

    for (_, param), grad in zip(named, expected):
        assert torch.allclose(param.grad, grad, rtol=1e-5, atol=1e-8)


def feed(clipper: GradientClipper, param: torch.nn.Parameter, norms):
    """Clip a gradient of each given norm in turn and return the statistics of every call."""
    results = []
    for norm in norms:
        set_norm(param, norm)
        results.append(clipper.clip())
    return results


def test_percentile_hand_values():
    param = parameter([0.0, 0.0, 0.0, 0.0])
    clipper = GradientClipper([('w', param)], {'mode': 'percentile', 'percentile': 50.0,
                                               'window': 4, 'warmup': 3})
    first, second, third = feed(clipper, param, [1.0, 2.0, 3.0])

    assert not first.clipped
    assert first.threshold is None
    assert not second.clipped
    # History [1, 2, 3] includes the current norm: median 2.
    assert third.threshold == pytest.approx(2.0)
    assert third.clipped
    assert third.norm_after == pytest.approx(2.0, rel=1e-5)
    assert torch.linalg.vector_norm(param.grad).item() == pytest.approx(2.0, rel=1e-5)

    fourth, fifth = feed(clipper, param, [10.0, 0.5])
    assert fourth.threshold == pytest.approx(2.5)
    # Window 4 drops the first norm: [2, 3, 10, 0.5], median 2.5.
    assert fifth.threshold == pytest.approx(2.5)
    assert not fifth.clipped


def test_percentile_matches_numpy():
    param = parameter([0.0] * 3)
    clipper = GradientClipper([('w', param)], {'mode': 'percentile', 'percentile': 90.0,
                                               'window': 7, 'warmup': 1})
    generator = np.random.default_rng(5)
    norms = list(generator.uniform(0.1, 5.0, size=20))
    stats = feed(clipper, param, norms)

    for index, record in enumerate(stats):
        window = norms[max(0, index - 6):index + 1]
        assert record.threshold == pytest.approx(np.percentile(window, 90.0), rel=1e-6)


def test_percentile_warmup_max_norm():
    param = parameter([0.0, 0.0])
    clipper = GradientClipper([('w', param)], {'mode': 'percentile', 'warmup': 5,
                                               'max_norm': 1.0})
    stats = feed(clipper, param, [3.0])[0]

    assert stats.threshold == 1.0
    assert stats.clipped
    assert torch.linalg.vector_norm(param.grad).item() == pytest.approx(1.0, rel=1e-5)


def test_zscore_hand_values():
    param = parameter([0.0, 0.0])
    clipper = GradientClipper([('w', param)], {'mode': 'zscore', 'warmup': 3})
    warm = feed(clipper, param, [1.0, 2.0, 3.0])
    assert not any(record.clipped for record in warm)

    spike = feed(clipper, param, [10.0])[0]
    mean, var = 2.0, 2.0 / 3.0
    bound = mean + 2.5 * math.sqrt(var)
    assert spike.clipped
    assert spike.threshold == pytest.approx(bound)
    assert torch.linalg.vector_norm(param.grad).item() == pytest.approx(bound, rel=1e-5)

    # The EMA takes the clipped norm; the variance uses the updated mean.
    new_mean = 0.97 * mean + 0.03 * bound
    new_var = 0.97 * var + 0.03 * (bound - new_mean) ** 2
    state = clipper.state_dict()
    assert state['ema_mean'] == pytest.approx(new_mean)
    assert state['ema_var'] == pytest.approx(new_var)


def test_zscore_small_change_not_clipped():
    param = parameter([0.0, 0.0])
    clipper = GradientClipper([('w', param)], {'mode': 'zscore', 'warmup': 3})
    feed(clipper, param, [1.0, 2.0, 3.0])
    stats = feed(clipper, param, [2.5])[0]

    assert not stats.clipped
    assert stats.norm_after == stats.norm_before


# --------------------------------------------------------------------------------------------
# Properties


shapes_strategy = st.lists(
    st.one_of(
        st.tuples(st.integers(1, 6)),
        st.tuples(st.integers(1, 5), st.integers(1, 7)),
        st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
    ),
    min_size=1, max_size=4)
scale_strategy = st.sampled_from([1e-6, 1e-3, 1.0, 1e3])


@PROPERTY_SETTINGS
@given(shapes=shapes_strategy, seed=st.integers(0, 2 ** 31 - 1), scale=scale_strategy,
       max_norm=st.floats(1e-3, 10.0))
def test_norm_property_bounded_same_direction(shapes, seed, scale, max_norm):
    named = random_named(seed, shapes, scale)
    before = [param.grad.clone() for _, param in named]
    GradientClipper(named, {'mode': 'norm', 'max_norm': max_norm}).clip()

    after = [param.grad for _, param in named]
    total = torch.linalg.vector_norm(torch.cat([grad.flatten() for grad in after])).item()
    assert total <= max_norm * (1 + 1e-5)
    for old, new in zip(before, after):
        if old.norm() > 0:
            # Unit vectors, not cosine_similarity: its 1e-8 norm floor breaks on tiny gradients.
            direction = old.flatten() / old.norm()
            assert torch.allclose(new.flatten() / new.norm(), direction, rtol=0.0, atol=1e-5)


@PROPERTY_SETTINGS
@given(shapes=shapes_strategy, seed=st.integers(0, 2 ** 31 - 1), scale=scale_strategy,
       rel_tol=st.floats(1e-3, 1.0), abs_tol=st.sampled_from([0.0, 1e-4, 1e-2]))
def test_unitwise_property_bounded_same_direction(shapes, seed, scale, rel_tol, abs_tol):
    named = random_named(seed, shapes, scale)
    before = [param.grad.clone() for _, param in named]
    GradientClipper(named, {'mode': 'unitwise', 'abs_tol': abs_tol, 'rel_tol': rel_tol}).clip()

    for (_, param), old in zip(named, before):
        rows = param.grad.view(param.shape[0], -1) if param.dim() >= 2 else param.grad.view(1, -1)
        weights = param.detach().view(rows.shape)
        bounds = torch.clamp(weights.norm(dim=1).clamp(min=1e-3) * rel_tol, min=abs_tol)
        assert torch.all(rows.norm(dim=1) <= bounds * (1 + 1e-5) + 1e-12)
        old_rows = old.view(rows.shape)
        for old_row, new_row in zip(old_rows, rows):
            if old_row.norm() > 0:
                direction = old_row / old_row.norm()
                assert torch.allclose(new_row / new_row.norm(), direction, rtol=0.0, atol=1e-5)


@PROPERTY_SETTINGS
@given(shapes=shapes_strategy, seed=st.integers(0, 2 ** 31 - 1), scale=scale_strategy,
       rel_tol=st.floats(1e-3, 1.0), abs_tol=st.floats(0.0, 1.0))
def test_relative_property_inside_bound_unchanged(shapes, seed, scale, rel_tol, abs_tol):
    named = random_named(seed, shapes, scale)
    before = [param.grad.clone() for _, param in named]
    GradientClipper(named, {'mode': 'relative', 'abs_tol': abs_tol, 'rel_tol': rel_tol}).clip()

    for (_, param), old in zip(named, before):
        bound = torch.clamp(param.detach().abs() * rel_tol, min=abs_tol)
        inside = old.abs() <= bound
        assert torch.equal(param.grad[inside], old[inside])
        assert torch.equal(param.grad[old.abs() <= abs_tol], old[old.abs() <= abs_tol])
        assert torch.all(param.grad.abs() <= bound)


@PROPERTY_SETTINGS
@given(shapes=shapes_strategy, seed=st.integers(0, 2 ** 31 - 1), scale=scale_strategy,
       abs_tol=st.floats(1e-4, 10.0))
def test_value_property_inside_bound_unchanged(shapes, seed, scale, abs_tol):
    named = random_named(seed, shapes, scale)
    before = [param.grad.clone() for _, param in named]
    stats = GradientClipper(named, {'mode': 'value', 'abs_tol': abs_tol}).clip()

    outside = 0
    for (_, param), old in zip(named, before):
        inside = old.abs() <= abs_tol
        outside += int((~inside).sum())
        assert torch.equal(param.grad[inside], old[inside])
        assert torch.equal(param.grad, old.clamp(-abs_tol, abs_tol))
    assert stats.clip_fraction == pytest.approx(outside / sum(old.numel() for old in before))


# --------------------------------------------------------------------------------------------
# Non-finite gradients


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('bad', [math.nan, math.inf])
def test_nonfinite_skip_leaves_grads(mode, bad):
    model = tiny_cnn()
    backward(model)
    clipper = GradientClipper(model.named_parameters(), {'mode': mode, **MODE_SETTINGS[mode]})
    model[0].bias.grad[1] = bad
    before = clone_grads(model.named_parameters())
    state = clipper.state_dict()
    stats = clipper.clip()

    assert stats.skip_step
    assert stats.nonfinite_count == 1
    assert stats.nonfinite_names == ['0.bias']
    assert not stats.clipped
    after = clone_grads(model.named_parameters())
    for name, grad in before.items():
        assert torch.equal(grad.isnan(), after[name].isnan()), name
        assert torch.equal(grad.nan_to_num(), after[name].nan_to_num()), name
    new_state = clipper.state_dict()
    assert new_state['norm_history'] == state['norm_history']
    assert new_state['warmup_norms'] == state['warmup_norms']


@pytest.mark.parametrize('mode', MODES)
def test_nonfinite_zero_policy(mode):
    model = tiny_cnn()
    backward(model)
    reference = copy.deepcopy(model)
    for param, ref in zip(model.parameters(), reference.parameters()):
        ref.grad = param.grad.clone()
    settings = {'mode': mode, **MODE_SETTINGS[mode], 'on_nonfinite': 'zero'}
    model[4].bias.grad[0] = math.nan
    reference[4].bias.grad.zero_()
    stats = GradientClipper(model.named_parameters(), settings).clip()
    expected = GradientClipper(reference.named_parameters(), settings).clip()

    assert stats.nonfinite_count == 1
    assert stats.nonfinite_names == ['4.bias']
    assert not stats.skip_step
    assert torch.equal(model[4].bias.grad, torch.zeros(5))
    for param, ref in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(param.grad, ref.grad, rtol=1e-6, atol=0.0)
    assert stats.clip_fraction == pytest.approx(expected.clip_fraction)


@pytest.mark.parametrize('mode', ['value', 'relative', 'unitwise', 'norm'])
def test_nonfinite_error_names_parameter(mode):
    model = tiny_cnn()
    backward(model)
    model[1].weight.grad[0] = math.inf
    before = clone_grads(model.named_parameters())
    clipper = GradientClipper(model.named_parameters(),
                              {'mode': mode, **MODE_SETTINGS[mode], 'on_nonfinite': 'error'})

    with pytest.raises(FloatingPointError, match=r'1\.weight'):
        clipper.clip()
    for name, param in model.named_parameters():
        assert torch.equal(param.grad, before[name])


@pytest.mark.parametrize('mode', ['percentile', 'zscore'])
def test_nonfinite_norm_not_in_history(mode):
    param = parameter([0.0, 0.0])
    clipper = GradientClipper([('w', param)], {'mode': mode, 'warmup': 2})
    feed(clipper, param, [1.0, 2.0, 3.0])
    state = clipper.state_dict()
    param.grad = torch.tensor([math.nan, 1.0])
    clipper.clip()
    param.grad = torch.tensor([math.inf, 1.0])
    clipper.clip()

    after = clipper.state_dict()
    for key in ('norm_history', 'warmup_norms', 'ema_mean', 'ema_var'):
        assert after[key] == state[key], key


# --------------------------------------------------------------------------------------------
# State


@pytest.mark.parametrize('mode', ['percentile', 'zscore'])
def test_state_restart_midway_identical(mode, tmp_path):
    generator = torch.Generator().manual_seed(7)
    sequence = [torch.randn(3, 4, generator=generator) * float(scale)
                for scale in [1, 1.2, 1, 0.9, 1, 1.1, 1, 10, 1, 1, 12, 1]]
    settings = {'mode': mode, 'warmup': 3}
    if mode == 'percentile':
        settings.update(window=5, percentile=50.0)

    def run(grads, clipper, param):
        results = []
        for grad in grads:
            param.grad = grad.clone()
            results.append((clipper.clip().as_dict(), param.grad.clone()))
        return results

    param = torch.nn.Parameter(torch.zeros(3, 4))
    straight = run(sequence, GradientClipper([('w', param)], settings), param)

    param = torch.nn.Parameter(torch.zeros(3, 4))
    first = GradientClipper([('w', param)], settings)
    half = run(sequence[:6], first, param)
    torch.save(first.state_dict(), tmp_path / 'clipper.pt')
    restarted = GradientClipper([('w', param)], settings)
    restarted.load_state_dict(torch.load(tmp_path / 'clipper.pt', weights_only=True))
    rest = run(sequence[6:], restarted, param)

    assert any(record['clipped'] for record, _ in straight[6:])
    for (expected, expected_grad), (actual, actual_grad) in zip(straight, half + rest):
        assert actual == expected
        assert torch.equal(actual_grad, expected_grad)


def test_state_dict_plain_values():
    param = parameter([0.0, 0.0])
    clipper = GradientClipper([('w', param)], {'mode': 'zscore', 'warmup': 2})
    feed(clipper, param, [1.0, 2.0, 4.0])
    state = clipper.state_dict()

    assert json.loads(json.dumps(state)) == state
    assert state['step'] == 3
    assert state['clip_history'] == [0, 0, 1]


def test_load_state_dict_mode_mismatch():
    param = parameter([0.0, 0.0])
    zscore = GradientClipper([('w', param)], {'mode': 'zscore'})
    percentile = GradientClipper([('w', param)], {'mode': 'percentile'})

    with pytest.raises(ValueError, match='mode'):
        percentile.load_state_dict(zscore.state_dict())


def test_load_state_dict_truncates_to_window():
    param = parameter([0.0, 0.0])
    big = GradientClipper([('w', param)], {'mode': 'percentile', 'window': 10, 'warmup': 1})
    feed(big, param, [float(value) for value in range(1, 11)])
    small = GradientClipper([('w', param)], {'mode': 'percentile', 'window': 4, 'warmup': 1})
    small.load_state_dict(big.state_dict())

    assert small.state_dict()['norm_history'] == pytest.approx([7.0, 8.0, 9.0, 10.0])


# --------------------------------------------------------------------------------------------
# Statistics


def test_stats_top_norms_order():
    named = [('small', parameter([0.0], [1.0])), ('large', parameter([0.0, 0.0], [3.0, 4.0])),
             ('medium', parameter([0.0], [2.0]))]
    stats = GradientClipper(named, {'mode': 'norm', 'max_norm': 100.0, 'top_k': 2}).clip()

    assert [name for name, _ in stats.top_norms] == ['large', 'medium']
    assert [norm for _, norm in stats.top_norms] == pytest.approx([5.0, 2.0])


def test_stats_top_norms_nan_first():
    named = [('fine', parameter([0.0], [100.0])), ('broken', parameter([0.0], [math.nan]))]
    stats = GradientClipper(named, {'mode': 'value', 'abs_tol': 1.0, 'top_k': 1}).clip()

    assert stats.top_norms[0][0] == 'broken'
    assert stats.as_dict()['top_norms'] == [{'name': 'broken', 'norm': None}]


def test_stats_clip_rate_rolling():
    param = parameter([0.0, 0.0])
    clipper = GradientClipper([('w', param)],
                              {'mode': 'norm', 'max_norm': 1.0, 'clip_rate_window': 3})
    rates = [record.clip_rate for record in feed(clipper, param, [2.0, 0.5, 0.5, 0.5, 2.0])]

    assert rates == pytest.approx([1.0, 1 / 2, 1 / 3, 0.0, 1 / 3])


def test_stats_step_counts_calls():
    param = parameter([0.0, 0.0])
    clipper = GradientClipper([('w', param)], {'mode': 'norm', 'max_norm': 1.0})
    steps = [record.step for record in feed(clipper, param, [0.5, 0.5, 0.5])]

    assert steps == [1, 2, 3]


@pytest.mark.parametrize('mode', MODES)
def test_stats_as_dict_json(mode):
    model = tiny_cnn()
    backward(model)
    stats = GradientClipper(model.named_parameters(), {'mode': mode, **MODE_SETTINGS[mode]}).clip()
    record = stats.as_dict()

    assert isinstance(stats, ClipStats)
    assert json.loads(json.dumps(record, allow_nan=False)) == record
    expected_keys = {'step', 'mode', 'norm_before', 'norm_after', 'threshold', 'clipped',
                     'clip_fraction', 'nonfinite_count', 'skip_step', 'top_norms', 'clip_rate',
                     'abs_tol', 'rel_tol', 'nonfinite_names'}
    assert set(record) == expected_keys
    assert len(record['top_norms']) == 5


def test_stats_unitwise_fraction_counts_units():
    weight = torch.ones(4, 2)
    param = torch.nn.Parameter(weight)
    param.grad = torch.tensor([[10.0, 0.0], [0.0, 0.0], [10.0, 0.0], [0.01, 0.0]])
    bias = parameter([1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0])
    stats = GradientClipper([('fc.weight', param), ('fc.bias', bias)],
                            {'mode': 'unitwise', 'rel_tol': 0.1}).clip()

    # Units: 4 rows of fc.weight plus fc.bias as a whole; rows 0 and 2 are clipped.
    assert stats.clip_fraction == pytest.approx(2 / 5)


# --------------------------------------------------------------------------------------------
# Selection and overrides


def test_exclude_pattern_leaves_parameters():
    model = tiny_cnn()
    backward(model)
    before = clone_grads(model.named_parameters())
    clipper = GradientClipper(model.named_parameters(),
                              {'mode': 'value', 'abs_tol': 1e-3, 'exclude': ['*.bias', '1.*']})
    clipper.clip()

    assert clipper.names == ['0.weight', '4.weight']
    for name, param in model.named_parameters():
        if name.endswith('.bias') or name.startswith('1.'):
            assert torch.equal(param.grad, before[name]), name
        else:
            assert param.grad.abs().max() <= 1e-3, name


def test_include_pattern_selects():
    model = tiny_cnn()
    backward(model)
    clipper = GradientClipper(model.named_parameters(),
                              {'mode': 'norm', 'max_norm': 1.0, 'include': ['4.*']})

    assert clipper.names == ['4.weight', '4.bias']


def test_include_nothing_raises():
    with pytest.raises(ValueError, match='select'):
        GradientClipper(tiny_cnn().named_parameters(),
                        {'mode': 'norm', 'max_norm': 1.0, 'include': ['head.*']})


def test_override_first_match_wins():
    named = [('head.bias', parameter([0.0, 0.0], [5.0, -5.0])),
             ('head.weight', parameter([0.0, 0.0], [5.0, -5.0])),
             ('body.bias', parameter([0.0, 0.0], [5.0, -5.0]))]
    overrides = [{'pattern': 'head.*', 'abs_tol': 2.0}, {'pattern': '*.bias', 'abs_tol': 3.0}]
    GradientClipper(named, {'mode': 'value', 'abs_tol': 1.0, 'overrides': overrides}).clip()

    assert named[0][1].grad.tolist() == [2.0, -2.0]
    assert named[1][1].grad.tolist() == [2.0, -2.0]
    assert named[2][1].grad.tolist() == [3.0, -3.0]


def test_override_relative_thresholds():
    named = [('a', parameter([1.0, 1.0], [5.0, 0.05])), ('b', parameter([1.0, 1.0], [5.0, 0.05]))]
    overrides = [{'pattern': 'b', 'rel_tol': 1.0, 'abs_tol': 0.01}]
    stats = GradientClipper(named, {'mode': 'relative', 'abs_tol': 0.1, 'rel_tol': 0.2,
                                    'overrides': overrides}).clip()

    assert named[0][1].grad.tolist() == pytest.approx([0.2, 0.05])
    assert named[1][1].grad.tolist() == pytest.approx([1.0, 0.05])
    assert stats.clip_fraction == pytest.approx(2 / 4)


def test_override_unitwise_thresholds():
    named = [('conv.weight', parameter([[1.0], [1.0]], [[1.0], [1.0]])),
             ('bn.weight', parameter([1.0, 1.0], [1.0, 0.0]))]
    overrides = [{'pattern': 'bn.*', 'rel_tol': 0.5}]
    GradientClipper(named, {'mode': 'unitwise', 'rel_tol': 0.1, 'overrides': overrides}).clip()

    assert named[0][1].grad.flatten().tolist() == pytest.approx([0.1, 0.1])
    # bn.weight is one unit: weight norm sqrt(2), bound 0.5 * sqrt(2).
    assert named[1][1].grad.tolist() == pytest.approx([0.5 * math.sqrt(2), 0.0])


def test_override_norm_groups():
    named = [('body.weight', parameter([0.0, 0.0], [3.0, 4.0])),
             ('head.weight', parameter([0.0, 0.0], [6.0, 8.0]))]
    overrides = [{'pattern': 'head.*', 'max_norm': 1.0}]
    stats = GradientClipper(named, {'mode': 'norm', 'max_norm': 10.0,
                                    'overrides': overrides}).clip()

    # body (norm 5) stays below 10; head (norm 10) is clipped to 1 on its own.
    assert named[0][1].grad.tolist() == [3.0, 4.0]
    assert torch.linalg.vector_norm(named[1][1].grad).item() == pytest.approx(1.0, rel=1e-5)
    assert stats.clipped
    assert stats.norm_after == pytest.approx(math.sqrt(25.0 + 1.0), rel=1e-5)


def test_override_matching_nothing_raises():
    with pytest.raises(ValueError, match='overrides'):
        GradientClipper([('w', parameter([0.0]))],
                        {'mode': 'value', 'abs_tol': 1.0,
                         'overrides': [{'pattern': 'head.*', 'abs_tol': 2.0}]})


@pytest.mark.parametrize('mode', MODES)
def test_missing_grads_ignored(mode):
    model = tiny_cnn()
    backward(model)
    model[1].weight.grad = None
    present = [param.grad for param in model.parameters() if param.grad is not None]
    expected = torch.linalg.vector_norm(torch.stack([grad.norm() for grad in present])).item()
    clipper = GradientClipper(model.named_parameters(), {'mode': mode, **MODE_SETTINGS[mode]})
    stats = clipper.clip()

    assert model[1].weight.grad is None
    assert '1.weight' not in [name for name, _ in stats.top_norms]
    assert stats.norm_before == pytest.approx(expected, rel=1e-5)

    # The same clipper keeps working when the gradient comes back.
    backward(model, seed=1)
    assert clipper.clip().norm_before > 0


def test_flat_modes_many_chunks():
    """Models larger than one scratch chunk give the same result as a small reference."""
    named = random_named(9, [(300, 300), (70000,), (40, 40, 3, 3), (5,)], scale=0.1)
    expected = []
    for _, param in named:
        expected.append(torch.clamp(param.grad, -0.05, 0.05))
    stats = GradientClipper(named, {'mode': 'value', 'abs_tol': 0.05}).clip()

    for (_, param), grad in zip(named, expected):
        assert torch.equal(param.grad, grad)
    total = sum(grad.numel() for grad in expected)
    assert 0.0 < stats.clip_fraction < 1.0
    # float32 sums over 10**5 elements carry errors of about 1e-5 (torch's own norm too).
    exact = torch.cat([grad.flatten() for grad in expected]).double().norm().item()
    assert stats.norm_after == pytest.approx(exact, rel=1e-4)
    assert total == 300 * 300 + 70000 + 40 * 40 * 9 + 5


def test_mixed_dtypes_raise():
    named = [('a', torch.nn.Parameter(torch.zeros(2))),
             ('b', torch.nn.Parameter(torch.zeros(2, dtype=torch.float64)))]

    with pytest.raises(ValueError, match='"b"'):
        GradientClipper(named, {'mode': 'norm', 'max_norm': 1.0})


# --------------------------------------------------------------------------------------------
# Mixed precision


def test_grad_scaler_order():
    model = tiny_cnn()
    reference = copy.deepcopy(model)
    scaler = torch.amp.GradScaler('cpu', init_scale=1024.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    clipper = GradientClipper(model.named_parameters(), {'mode': 'norm', 'max_norm': 0.5})
    inputs = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = model(inputs).float().square().sum()
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    stats = clipper.clip()
    scaler.step(optimizer)
    scaler.update()

    assert scaler.is_enabled()
    assert not stats.skip_step
    assert stats.clipped
    # The clipper saw unscaled gradients: the same norm as a plain fp32-gradient backward.
    with torch.autocast('cpu', dtype=torch.bfloat16):
        reference(inputs).float().square().sum().backward()
    plain = torch.linalg.vector_norm(
        torch.stack([param.grad.norm() for param in reference.parameters()])).item()
    assert stats.norm_before == pytest.approx(plain, rel=1e-3)
    for param, ref in zip(model.parameters(), reference.parameters()):
        assert not torch.equal(param, ref)


# --------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize('data, field', [
    ({'mode': 'clamp'}, 'mode'),
    ({'max_norm': 1.0}, 'mode'),
    ({'mode': 'norm', 'max_norm': 1.0, 'maxnorm': 2.0}, 'maxnorm'),
    ({'mode': 'norm'}, 'max_norm'),
    ({'mode': 'norm', 'max_norm': -1.0}, 'max_norm'),
    ({'mode': 'norm', 'max_norm': math.inf}, 'max_norm'),
    ({'mode': 'value'}, 'abs_tol'),
    ({'mode': 'value', 'abs_tol': -0.1}, 'abs_tol'),
    ({'mode': 'value', 'abs_tol': True}, 'abs_tol'),
    ({'mode': 'relative', 'abs_tol': 0.1}, 'rel_tol'),
    ({'mode': 'relative', 'rel_tol': 0.1}, 'abs_tol'),
    ({'mode': 'unitwise'}, 'rel_tol'),
    ({'mode': 'unitwise', 'rel_tol': -0.01}, 'rel_tol'),
    ({'mode': 'unitwise', 'rel_tol': 0.01, 'eps': 0.0}, 'eps'),
    ({'mode': 'percentile', 'percentile': 0.0}, 'percentile'),
    ({'mode': 'percentile', 'percentile': 100.5}, 'percentile'),
    ({'mode': 'percentile', 'window': 0}, 'window'),
    ({'mode': 'percentile', 'window': 10, 'warmup': 20}, 'warmup'),
    ({'mode': 'zscore', 'z_max': 0.0}, 'z_max'),
    ({'mode': 'zscore', 'alpha': 1.0}, 'alpha'),
    ({'mode': 'zscore', 'warmup': 2.5}, 'warmup'),
    ({'mode': 'norm', 'max_norm': 1.0, 'z_max': 3.0}, 'z_max'),
    ({'mode': 'norm', 'max_norm': 1.0, 'on_nonfinite': 'ignore'}, 'on_nonfinite'),
    ({'mode': 'norm', 'max_norm': 1.0, 'top_k': -1}, 'top_k'),
    ({'mode': 'norm', 'max_norm': 1.0, 'clip_rate_window': 0}, 'clip_rate_window'),
    ({'mode': 'norm', 'max_norm': 1.0, 'include': '*'}, 'include'),
    ({'mode': 'norm', 'max_norm': 1.0, 'exclude': [3]}, 'exclude'),
    ({'mode': 'zscore', 'overrides': [{'pattern': '*', 'max_norm': 1.0}]}, 'overrides'),
    ({'mode': 'value', 'abs_tol': 1.0, 'overrides': [{'abs_tol': 1.0}]}, 'pattern'),
    ({'mode': 'value', 'abs_tol': 1.0, 'overrides': [{'pattern': '*'}]}, 'overrides[0]'),
    ({'mode': 'value', 'abs_tol': 1.0, 'overrides': [{'pattern': '*', 'rel_tol': 1.0}]},
     'rel_tol'),
    ({'mode': 'value', 'abs_tol': 1.0, 'overrides': [{'pattern': '*', 'abs_tol': -1.0}]},
     'abs_tol'),
    ({'mode': 'value', 'abs_tol': 1.0, 'overrides': [{'pattern': '*', 'size': 1.0}]}, 'size'),
])
def test_config_error_names_field(data, field):
    with pytest.raises(ValueError) as error:
        ClipConfig.from_dict(data)

    assert field in str(error.value)


def test_config_error_shows_value_and_allowed():
    with pytest.raises(ValueError) as error:
        ClipConfig.from_dict({'mode': 'percentile', 'percentile': 150})

    message = str(error.value)
    assert '150' in message
    assert '100' in message


def test_config_defaults():
    config = ClipConfig.from_dict({'mode': 'percentile'})

    assert config.percentile == 90.0
    assert config.window == 1000
    assert config.warmup == 25
    assert config.on_nonfinite == 'skip'
    assert config.top_k == 5
    assert config.clip_rate_window == 100
    assert ClipConfig.from_dict({'mode': 'zscore'}).z_max == 2.5
    assert ClipConfig.from_dict({'mode': 'zscore'}).alpha == 0.97
    assert ClipConfig.from_dict({'mode': 'unitwise', 'rel_tol': 0.01}).eps == 1e-3


def test_config_yaml_section(tmp_path):
    path = tmp_path / 'training.yaml'
    path.write_text('clipping:\n  mode: unitwise\n  rel_tol: 0.01\n  exclude: ["*bn*"]\n'
                    '  overrides:\n    - {pattern: "head.*", rel_tol: 0.05}\n')
    config = ClipConfig.from_yaml(str(path), section='clipping')

    assert config.mode == 'unitwise'
    assert config.exclude == ['*bn*']
    assert config.overrides[0].rel_tol == 0.05
    assert ClipConfig.from_dict(config.to_dict()) == config


def test_config_yaml_missing_section(tmp_path):
    path = tmp_path / 'training.yaml'
    path.write_text('other: 1\n')

    with pytest.raises(ValueError, match='clipping'):
        ClipConfig.from_yaml(str(path), section='clipping')


def test_config_accepts_dict_in_clipper():
    clipper = GradientClipper(tiny_cnn().named_parameters(), {'mode': 'norm', 'max_norm': 1.0})

    assert isinstance(clipper.config, ClipConfig)
    assert clipper.mode == 'norm'
