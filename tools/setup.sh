#!/usr/bin/env bash
# Create .venv/ with the pinned PyTorch and ROS 2 Kilted wheels, build the vision_msgs interface
# package and gradclip_ros with colcon. Safe to re-run: finished steps are quick no-ops.
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv"
ws="$venv/ros_ws"
python=${PYTHON:-python3}

step() { printf '\n==> %s\n' "$*"; }
fail() {
    printf '\nmake setup failed at step "%s": %s\n' "$current" "$1" >&2
    exit 1
}

current='check Python'
step "$current"
version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])') \
    || fail "no '$python' on PATH; install Python 3.11 or set PYTHON=/path/to/python3.11"
[ "$version" = 3.11 ] || fail "found Python $version, but the ROS 2 Kilted wheels need 3.11 (set PYTHON=...)"
command -v cmake >/dev/null || fail 'cmake not found; install it (Debian: apt-get install cmake g++)'
command -v g++ >/dev/null || fail 'g++ not found; install it (Debian: apt-get install g++)'

current='create .venv'
step "$current"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv" || fail "python -m venv failed (Debian: apt-get install python3-venv)"
fi

current='install pinned Python packages'
step "$current (PyTorch is a large wheel; the first run takes a few minutes)"
# Skip pip when the lock file has not changed since the last successful install.
stamp="$venv/.requirements.sha256"
want=$(cat "$root/requirements.txt" "$root/requirements-lock.txt" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$venv/bin/python" -m pip install --disable-pip-version-check -q \
        -r "$root/requirements.txt" -c "$root/requirements-lock.txt" \
        || fail 'pip install failed; the error above names the package'
    echo "$want" > "$stamp"
else
    echo 'requirements unchanged, nothing to install'
fi

current='patch the CMake exports of the ROS wheels'
step "$current"
"$venv/bin/python" "$root/tools/patch_venv_cmake.py" "$venv" || fail 'see the message above'

current='build vision_msgs and gradclip_ros with colcon'
step "$current"
mkdir -p "$ws"
(
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
    export AMENT_PREFIX_PATH="$venv" CMAKE_PREFIX_PATH="$venv"
    cd "$ws" || exit 1
    # --paths names each package exactly, so colcon never crawls into .venv or build folders.
    colcon --log-base log build --paths "$root/tools/interfaces/vision_msgs" "$root" \
        --build-base build --install-base install --symlink-install \
        --event-handlers console_cohesion- \
        --cmake-args -DBUILD_TESTING=OFF -DPython3_EXECUTABLE="$venv/bin/python"
) || fail "colcon build failed; the log is in $ws/log/latest_build"

current='check the environment'
step "$current"
# shellcheck disable=SC1091
source "$root/tools/env.sh"
python -c 'import rclpy, torch, vision_msgs.msg, gradclip_ros' \
    || fail 'the built packages do not import; see the traceback above'

current='build the fused clipping kernel'
step "$current (about 20 s the first time)"
# Optional: without it, clipping modes value, relative and unitwise run slower torch ops.
python -m gradclip_ros.clip_kernel \
    || echo 'warning: the kernel did not build (message above); clipping still works, slower'

echo "set-up complete: $(du -sh "$venv" | cut -f1) in $venv"
