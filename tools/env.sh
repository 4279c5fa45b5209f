# Source this file to use the pip-based ROS 2 environment that `make setup` built.
# It activates .venv, adds the colcon workspace and keeps every ROS graph on this machine.
_gradclip_root=$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)
# shellcheck disable=SC1091
source "$_gradclip_root/.venv/bin/activate"
# colcon's setup script reads unset variables, so relax nounset while sourcing it.
case $- in *u*) _gradclip_nounset=1; set +u ;; *) _gradclip_nounset=0 ;; esac
export AMENT_PREFIX_PATH="$_gradclip_root/.venv${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
# shellcheck disable=SC1091
source "$_gradclip_root/.venv/ros_ws/install/setup.sh"
[ "$_gradclip_nounset" = 1 ] && set -u
export PATH="$_gradclip_root/.venv/ros_ws/install/gradclip_ros/lib/gradclip_ros:$PATH"
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_LOCALHOST_ONLY=1
export RMW_IMPLEMENTATION=rmw_fastrtps_cpp
# Large shared-memory segments so camera frames are not fragmented over UDP (see the XML).
export FASTDDS_DEFAULT_PROFILES_FILE="${FASTDDS_DEFAULT_PROFILES_FILE:-$_gradclip_root/config/fastdds_localhost_shm.xml}"
unset _gradclip_root _gradclip_nounset
