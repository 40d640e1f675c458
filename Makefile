# lsm_ros: the two commands of the README.
#   make demo   set up if needed, then run lsm_node on a stereo bag (products in demo_out/)
#   make test   set up if needed, then run the whole test suite (CPU)
# make setup creates .venv/ (ROS 2 Kilted wheels, pinned CPU torch stack, generated interfaces, the package).
VENV ?= .venv
DEMO_OUT ?= demo_out
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup demo test clean

setup:
	@bash scripts/setup_env.sh

demo: setup
	@bash scripts/ros_env.sh $(VENV)/bin/lsm-ros demo --out $(DEMO_OUT) $(DEMO_ARGS)

test: setup
	@bash scripts/ros_env.sh $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf build $(DEMO_OUT) .pytest_cache
