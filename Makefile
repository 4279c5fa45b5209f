# Pip-based set-up for machines without a ROS 2 install. On a ROS install, use colcon directly
# (see README). Every target keeps ROS discovery on this machine.
SHELL := /bin/bash
ENV := source tools/env.sh
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST
export ROS_LOCALHOST_ONLY := 1

.PHONY: setup test demo lint bench clean

setup:
	@bash tools/setup.sh

test:
	@$(ENV) && python -m pytest test $(PYTEST_ARGS)

demo:
	@$(ENV) && python -m gradclip_ros.demo $(DEMO_ARGS)

lint:
	@$(ENV) && ament_flake8 --config tools/ament_flake8.ini gradclip_ros test benchmarks launch tools && ament_pep257 gradclip_ros test --add-ignore D213

bench:
	@$(ENV) && for b in benchmarks/*.py; do python "$$b" || exit 1; done

clean:
	rm -rf .venv/ros_ws/build .venv/ros_ws/install .venv/ros_ws/log
