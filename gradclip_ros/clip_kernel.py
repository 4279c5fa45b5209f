"""Build and load the fused CPU kernels of clipping modes ``value``, ``relative`` and ``unitwise``.

The kernels (``csrc/fused_clip.cpp``) clip every gradient in place in one loop per tensor.
Torch ops need several passes over scratch copies for the same result and statistics (about
eight for ``relative``, see ``clipping._clip_relative``). The kernels are compiled for the
machine they run on (``-march=native``) with ``torch.utils.cpp_extension``. ``make setup``
builds them. A process that finds no build compiles them on first use (about 20 s), and later
processes load them in milliseconds.

The build goes to ``$GRADCLIP_ROS_KERNEL_DIR`` when set, else inside the active virtual
environment (``<venv>/var/cache/gradclip_ros``), else below torch's default extension folder
(``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``). Because of ``-march=native`` that
folder must not be shared by machines with different CPUs.

Without a C++ compiler or ninja, ``load()`` returns None, logs why once, and the clipper runs
its torch-op path. Run ``python -m gradclip_ros.clip_kernel`` to build and check them.
"""

import logging
import os
from pathlib import Path
import sys
import threading
import time
from typing import Any, Optional

LOGGER = logging.getLogger(__name__)

NAME = 'gradclip_ros_fused_clip'
SOURCE = Path(__file__).resolve().parent / 'csrc' / 'fused_clip.cpp'
CFLAGS = ['-O3', '-march=native', '-fopenmp-simd']

_lock = threading.Lock()
_module: Any = None
_error: Optional[str] = None


def build_directory() -> str:
    """Return the folder for the build (see the module docstring)."""
    configured = os.environ.get('GRADCLIP_ROS_KERNEL_DIR')
    if configured:
        return configured
    if sys.prefix != sys.base_prefix:
        return os.path.join(sys.prefix, 'var', 'cache', 'gradclip_ros')
    from torch.utils.cpp_extension import get_default_build_root
    return os.path.join(get_default_build_root(), NAME)


def load() -> Any:
    """Return the compiled kernel module, building it if needed, or None if that fails.

    Thread-safe. A failure is logged once as a warning and not retried in this process.
    """
    global _module, _error
    with _lock:
        if _module is not None or _error is not None:
            return _module
        try:
            _module = _build()
        except Exception as error:  # noqa: B902 - any build failure means: use torch ops
            _error = f'{type(error).__name__}: {error}'.strip()
            LOGGER.warning('fused clipping kernel unavailable, clipping modes value, relative '
                           'and unitwise use torch ops (slower): %s', _error.splitlines()[0])
        return _module


def load_error() -> Optional[str]:
    """Return why ``load()`` failed in this process, or None."""
    return _error


def _build() -> Any:
    # Importing cpp_extension warns about CUDA_HOME on machines without a GPU. The kernel
    # is CPU-only, so that warning does not apply here.
    extension_logger = logging.getLogger('torch.utils.cpp_extension')
    level = extension_logger.level
    extension_logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        extension_logger.setLevel(level)

    folder = build_directory()
    os.makedirs(folder, exist_ok=True)
    # Torch (2.14) serializes concurrent builds in one folder with an OS-level file lock that the
    # OS releases when a build is killed.
    return cpp_extension.load(name=NAME, sources=[str(SOURCE)], build_directory=folder,
                              extra_cflags=CFLAGS, verbose=False)


def main() -> int:
    """Build or find the kernel and print its folder. Return exit status 1 on failure."""
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    start = time.monotonic()
    module = load()
    if module is None:
        print(f'fused clipping kernel: not available ({_error})', file=sys.stderr)
        return 1
    print(f'fused clipping kernel: ready in {time.monotonic() - start:.1f} s '
          f'({build_directory()})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
