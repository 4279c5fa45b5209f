"""Configuration of the gradient clipper: modes, thresholds, parameter selection, validation.

``ClipConfig`` is a plain dataclass. ``ClipConfig.from_dict`` and ``ClipConfig.from_yaml``
reject unknown keys, keys that the chosen mode does not use, missing required thresholds and
out-of-range values with a ``ValueError`` that names the field, the value and what is allowed.
No torch import, so a ROS node can validate its parameters before it loads a model.
"""

from dataclasses import dataclass, field, fields
import math
from typing import Any, Dict, List, Mapping, Optional

import yaml

MODES = ('value', 'norm', 'relative', 'unitwise', 'percentile', 'zscore')
NONFINITE_POLICIES = ('skip', 'zero', 'error')

# Fields that only some modes read, with the modes that read them. A field outside this table
# is used by every mode.
MODE_FIELDS = {
    'abs_tol': ('value', 'relative', 'unitwise'),
    'rel_tol': ('relative', 'unitwise'),
    'max_norm': ('norm', 'percentile', 'zscore'),
    'eps': ('unitwise',),
    'percentile': ('percentile',),
    'window': ('percentile',),
    'warmup': ('percentile', 'zscore'),
    'z_max': ('zscore',),
    'alpha': ('zscore',),
    'overrides': ('value', 'norm', 'relative', 'unitwise'),
    'cpu_kernel': ('value', 'relative', 'unitwise'),
}

# The thresholds an override may set, per mode.
_OVERRIDE_KEYS = {
    'value': ('abs_tol',),
    'relative': ('abs_tol', 'rel_tol'),
    'unitwise': ('abs_tol', 'rel_tol'),
    'norm': ('max_norm',),
}


@dataclass(frozen=True)
class Override:
    """Thresholds for the selected parameters whose name matches ``pattern`` (fnmatch syntax).

    A field left at None keeps the config-wide value. In mode ``norm``, the parameters of an
    override with ``max_norm`` form their own norm group, clipped to that ``max_norm``.
    """

    pattern: str
    abs_tol: Optional[float] = None
    rel_tol: Optional[float] = None
    max_norm: Optional[float] = None


@dataclass
class ClipConfig:
    """Settings of one ``GradientClipper``.

    Thresholds (all in gradient units, except ``rel_tol`` which is a ratio):

    - ``abs_tol``: element bound for ``value`` (required, > 0); floor of the bound for
      ``relative`` (required, >= 0) and ``unitwise`` (default 0).
    - ``rel_tol``: bound per unit of weight magnitude for ``relative`` and ``unitwise``
      (required, >= 0).
    - ``max_norm``: global norm bound for ``norm`` (required, > 0); for ``percentile`` and
      ``zscore`` an optional bound used only during warm-up.
    - ``eps``: floor of a weight unit's norm in ``unitwise`` (default 1e-3, > 0).
    - ``percentile`` (default 90, in (0, 100]), ``window`` (default 1000 norms) and ``warmup``
      (default 25 norms, at most ``window``) for ``percentile``.
    - ``z_max`` (default 2.5, > 0), ``alpha`` (EMA decay, default 0.97, in (0, 1)) and
      ``warmup`` (default 25 norms) for ``zscore``.

    Selection and reporting:

    - ``include`` / ``exclude``: fnmatch patterns over parameter names (default: every
      parameter, none excluded).
    - ``overrides``: per-group thresholds, where the first matching pattern wins.
    - ``on_nonfinite``: ``skip`` (default), ``zero`` or ``error``.
    - ``top_k``: per-parameter norms in each record (default 5).
    - ``clip_rate_window``: calls that make up the rolling clip rate (default 100).

    Speed:

    - ``cpu_kernel``: modes ``value``, ``relative`` and ``unitwise`` on CPU with float32 or
      float64 run the fused kernels of ``clip_kernel`` (default True); False runs torch ops
      only. Value and relative give the same clipped gradients either way. Unitwise may
      differ in the last bit because the kernel sums unit norms in float64. For the same
      reason the reported norms of all three differ in the last digits.
    """

    mode: str
    abs_tol: Optional[float] = None
    rel_tol: Optional[float] = None
    max_norm: Optional[float] = None
    eps: float = 1e-3
    percentile: float = 90.0
    window: int = 1000
    warmup: int = 25
    z_max: float = 2.5
    alpha: float = 0.97
    include: List[str] = field(default_factory=lambda: ['*'])
    exclude: List[str] = field(default_factory=list)
    overrides: List[Override] = field(default_factory=list)
    on_nonfinite: str = 'skip'
    top_k: int = 5
    clip_rate_window: int = 100
    cpu_kernel: bool = True

    def __post_init__(self):
        self.overrides = [_to_override(item, index) for index, item in enumerate(self.overrides)]
        self.validate()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> 'ClipConfig':
        """Build and validate a config from a mapping such as a parsed YAML section.

        Besides the checks of ``validate``, a key that is unknown, or that the chosen mode
        does not read, raises ``ValueError``.
        """
        if not isinstance(data, Mapping):
            raise ValueError(
                f'clip config: expected a mapping of settings, got {type(data).__name__}')
        known = [item.name for item in fields(cls)]
        unknown = sorted(str(key) for key in data if key not in known)
        if unknown:
            raise ValueError(
                f'clip config: unknown key(s) {unknown}; allowed keys: {known}')
        if 'mode' not in data:
            raise ValueError(f'clip config: missing key "mode"; allowed modes: {list(MODES)}')

        mode = data['mode']
        _check_mode(mode)
        for key in data:
            users = MODE_FIELDS.get(key)
            if users is not None and mode not in users:
                raise ValueError(
                    f'clip config: key "{key}" is not used by mode "{mode}"; '
                    f'it is used by modes {list(users)}')
        return cls(**dict(data))

    @classmethod
    def from_yaml(cls, path: str, section: Optional[str] = None) -> 'ClipConfig':
        """Load a config from a YAML file; ``section`` picks a top-level key of that file."""
        with open(path, encoding='utf-8') as stream:
            data = yaml.safe_load(stream)
        if section is not None:
            if not isinstance(data, Mapping) or section not in data:
                raise ValueError(f'clip config: section "{section}" not found in {path}')
            data = data[section]
        return cls.from_dict(data)

    def to_dict(self) -> Dict[str, Any]:
        """Return the settings as plain Python values, accepted again by ``from_dict``."""
        result = {}
        for item in fields(self):
            value = getattr(self, item.name)
            users = MODE_FIELDS.get(item.name)
            if users is not None and self.mode not in users:
                continue
            if item.name == 'overrides':
                value = [_override_to_dict(override) for override in value]
            elif isinstance(value, list):
                value = list(value)
            if value is None:
                continue
            result[item.name] = value
        return result

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field if a setting is missing or out of range."""
        _check_mode(self.mode)
        mode = self.mode

        for name in ('abs_tol', 'rel_tol', 'max_norm'):
            users = MODE_FIELDS[name]
            if getattr(self, name) is not None and mode not in users:
                raise ValueError(
                    f'ClipConfig.{name}: set to {getattr(self, name)!r}, but mode "{mode}" '
                    f'does not use it; it is used by modes {list(users)}')

        if mode == 'value':
            _require(self, 'abs_tol', 'the element bound')
            _check_number('ClipConfig.abs_tol', self.abs_tol, minimum=0.0, inclusive=False)
        if mode == 'relative':
            _require(self, 'abs_tol', 'the bound for elements whose weight is near zero')
        if mode in ('relative', 'unitwise'):
            _require(self, 'rel_tol', 'the bound per unit of weight magnitude')
            _check_number('ClipConfig.rel_tol', self.rel_tol, minimum=0.0)
            if self.abs_tol is not None:
                _check_number('ClipConfig.abs_tol', self.abs_tol, minimum=0.0)
        if mode == 'norm':
            _require(self, 'max_norm', 'the bound on the global gradient norm')
        if self.max_norm is not None:
            _check_number('ClipConfig.max_norm', self.max_norm, minimum=0.0, inclusive=False)

        _check_number('ClipConfig.eps', self.eps, minimum=0.0, inclusive=False)
        _check_number('ClipConfig.percentile', self.percentile, minimum=0.0, inclusive=False,
                      maximum=100.0)
        _check_integer('ClipConfig.window', self.window, minimum=1)
        _check_integer('ClipConfig.warmup', self.warmup, minimum=1)
        if mode == 'percentile' and self.warmup > self.window:
            raise ValueError(
                f'ClipConfig.warmup: invalid value {self.warmup}; percentile mode needs '
                f'warmup <= window ({self.window}), or clipping would never start')
        _check_number('ClipConfig.z_max', self.z_max, minimum=0.0, inclusive=False)
        _check_number('ClipConfig.alpha', self.alpha, minimum=0.0, inclusive=False,
                      maximum=1.0, maximum_inclusive=False)

        _check_patterns('ClipConfig.include', self.include)
        _check_patterns('ClipConfig.exclude', self.exclude)
        if not self.include:
            raise ValueError('ClipConfig.include: empty list selects no parameter; '
                             "use ['*'] to select all")
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f'ClipConfig.on_nonfinite: invalid value {self.on_nonfinite!r}; '
                f'allowed: {list(NONFINITE_POLICIES)}')
        _check_integer('ClipConfig.top_k', self.top_k, minimum=0)
        _check_integer('ClipConfig.clip_rate_window', self.clip_rate_window, minimum=1)
        if not isinstance(self.cpu_kernel, bool):
            raise ValueError(
                f'ClipConfig.cpu_kernel: invalid value {self.cpu_kernel!r}; '
                'allowed: true or false')
        self._validate_overrides()

    def _validate_overrides(self) -> None:
        if self.overrides and self.mode not in _OVERRIDE_KEYS:
            raise ValueError(
                f'ClipConfig.overrides: mode "{self.mode}" takes no overrides; '
                f'overrides are used by modes {list(_OVERRIDE_KEYS)}')
        allowed = _OVERRIDE_KEYS.get(self.mode, ())
        for index, override in enumerate(self.overrides):
            where = f'ClipConfig.overrides[{index}]'
            if not isinstance(override.pattern, str) or not override.pattern:
                raise ValueError(
                    f'{where}.pattern: invalid value {override.pattern!r}; '
                    'expected a non-empty fnmatch pattern string')
            set_thresholds = [name for name in ('abs_tol', 'rel_tol', 'max_norm')
                              if getattr(override, name) is not None]
            if not set_thresholds:
                raise ValueError(
                    f'{where}: sets no threshold; mode "{self.mode}" accepts {list(allowed)}')
            for name in set_thresholds:
                if name not in allowed:
                    raise ValueError(
                        f'{where}.{name}: not used by mode "{self.mode}"; '
                        f'allowed override keys: {list(allowed)}')
                strict = (self.mode == 'value' and name == 'abs_tol') or name == 'max_norm'
                _check_number(f'{where}.{name}', getattr(override, name), minimum=0.0,
                              inclusive=not strict)


def _to_override(item: Any, index: int) -> Override:
    if isinstance(item, Override):
        return item
    where = f'ClipConfig.overrides[{index}]'
    if not isinstance(item, Mapping):
        raise ValueError(
            f'{where}: expected a mapping with "pattern" and thresholds, '
            f'got {type(item).__name__}')
    known = [entry.name for entry in fields(Override)]
    unknown = sorted(str(key) for key in item if key not in known)
    if unknown:
        raise ValueError(f'{where}: unknown key(s) {unknown}; allowed keys: {known}')
    if 'pattern' not in item:
        raise ValueError(f'{where}: missing key "pattern"')
    return Override(**dict(item))


def _override_to_dict(override: Override) -> Dict[str, Any]:
    result = {'pattern': override.pattern}
    for name in ('abs_tol', 'rel_tol', 'max_norm'):
        if getattr(override, name) is not None:
            result[name] = getattr(override, name)
    return result


def _check_mode(mode: Any) -> None:
    if mode not in MODES:
        raise ValueError(f'ClipConfig.mode: invalid value {mode!r}; allowed: {list(MODES)}')


def _require(config: ClipConfig, name: str, meaning: str) -> None:
    if getattr(config, name) is None:
        raise ValueError(
            f'ClipConfig.{name}: missing; mode "{config.mode}" requires it ({meaning})')


def _check_number(name: str, value: Any, minimum: float, inclusive: bool = True,
                  maximum: float = math.inf, maximum_inclusive: bool = True) -> None:
    low = '>=' if inclusive else '>'
    high = '' if maximum == math.inf else f" and {'<=' if maximum_inclusive else '<'} {maximum}"
    allowed = f'a finite number {low} {minimum}{high}'
    # bool is an int subclass, but True as a threshold is almost surely a typo.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f'{name}: invalid value {value!r}; expected {allowed}')
    too_low = value < minimum if inclusive else value <= minimum
    too_high = value > maximum if maximum_inclusive else value >= maximum
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int beyond the float range
        finite = False
    if not finite or too_low or too_high:
        raise ValueError(f'{name}: invalid value {value!r}; expected {allowed}')


def _check_integer(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f'{name}: invalid value {value!r}; expected an integer >= {minimum}')


def _check_patterns(name: str, patterns: Any) -> None:
    if not isinstance(patterns, (list, tuple)) or not all(
            isinstance(pattern, str) and pattern for pattern in patterns):
        raise ValueError(
            f'{name}: invalid value {patterns!r}; expected a list of fnmatch pattern strings')
