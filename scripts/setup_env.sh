#!/usr/bin/env bash
# Set up lsm_ros on a machine with no ROS installation: a virtual environment (.venv/ at the repository
# root) with the ROS 2 Kilted wheels, pinned CPU torch and the ML stack, colcon, tf2_msgs, vision_msgs and this
# package's own interfaces generated with cmake, and the package installed (console commands lsm-ros and lsm_node).
#
# Idempotent: each step records a stamp (the hash of its inputs) in .venv/.lsm_ros_setup/ and is skipped
# when its inputs did not change. Prints what it does.
#
# usage: scripts/setup_env.sh            (or: make setup)
# env:   PYTHON (default python3.11, else python3), VENV (default .venv), JOBS (default nproc)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
JOBS=${JOBS:-$(nproc)}
STAMPS=$VENV/.lsm_ros_setup
BUILD=$ROOT/build/setup
say() { printf '[setup] %s\n' "$*"; }

stamp_ok() { [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]; }
stamp_set() { mkdir -p "$STAMPS"; printf '%s' "$2" >"$STAMPS/$1"; }
hash_of() { { cat "$@" 2>/dev/null || true; } | sha256sum | cut -c1-16; }

# ------------------------------------------------------------------------------------------------ venv
if [ ! -x "$VENV/bin/python" ]; then
  PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
  say "creating virtual environment $VENV with $("$PY" --version 2>&1)"
  "$PY" -m venv "$VENV"
else
  say "virtual environment $VENV exists"
fi
VPY=$VENV/bin/python
# pip, quiet, without the warnings some pip configurations print for every unused extra index
pip_quiet() { "$VPY" -m pip -q "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }
"$VPY" -c 'import sys; assert sys.version_info[:2] == (3, 11), "ROS 2 Kilted wheels need Python 3.11, got %s" % sys.version' \
  || { echo "[setup] error: the ROS 2 Kilted wheels are built for CPython 3.11; set PYTHON=python3.11" >&2; exit 1; }

# ------------------------------------------------------------------------------------------------ wheels
ROS_WHEELS=(
  'ros-kilted-rclpy[fastrtps]' ros-kilted-builtin-interfaces ros-kilted-std-msgs ros-kilted-geometry-msgs
  ros-kilted-sensor-msgs ros-kilted-std-srvs ros-kilted-diagnostic-msgs ros-kilted-lifecycle-msgs
  ros-kilted-rosidl-default-generators ros-kilted-rosidl-core-generators ros-kilted-ament-cmake
  ros-kilted-ament-cmake-python ros-kilted-ament-cmake-include-directories ros-kilted-ament-cmake-ros-core
  ros-kilted-ament-package catkin-pkg
)
WHEEL_KEY=$(printf '%s\n' "${ROS_WHEELS[@]}" | cat - "$ROOT/requirements.txt" "$ROOT/constraints.txt" | sha256sum | cut -c1-16)
if stamp_ok wheels "$WHEEL_KEY"; then
  say "python packages up to date"
else
  say "installing pinned python packages (torch 2.13.0 CPU, torchvision, timm, open_clip, gsplat, ...)"
  pip_quiet install --upgrade pip 'setuptools>=68,<80' wheel  # colcon-core needs setuptools<80
  pip_quiet install -c "$ROOT/constraints.txt" -r "$ROOT/requirements.txt"
  say "installing ROS 2 Kilted wheels (rclpy, Fast DDS, message packages, rosidl generators)"
  pip_quiet install -c "$ROOT/constraints.txt" "${ROS_WHEELS[@]}"
  stamp_set wheels "$WHEEL_KEY"
fi

# The wheels' exported CMake files name the wheel builder's interpreter paths; point them at ours.
PYINC=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
NPINC=$("$VPY" -c 'import numpy; print(numpy.get_include())')
[ -f "$PYINC/Python.h" ] || { echo "[setup] error: Python.h missing in $PYINC (install python3.11-dev)" >&2; exit 1; }
fixed=$({ grep -rl '/opt/python/cp311-cp311' "$VENV/share" --include='*.cmake' 2>/dev/null || true; } | wc -l)
if [ "$fixed" -gt 0 ]; then
  say "re-pointing $fixed exported CMake files of the ROS wheels at this interpreter's headers"
  { grep -rl '/opt/python/cp311-cp311' "$VENV/share" --include='*.cmake' || true; } | xargs -r sed -i \
    -e "s#/opt/python/cp311-cp311/include/python3.11#$PYINC#g" \
    -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include#$NPINC#g"
fi

# ------------------------------------------------------------------------------------------------ interfaces
export AMENT_PREFIX_PATH="$VENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
export CMAKE_PREFIX_PATH="$VENV${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
build_interfaces() {  # name src_dir [extra cmake args...]
  local name=$1 src=$2; shift 2
  local bdir=$BUILD/$name
  mkdir -p "$bdir"
  say "generating ROS interfaces of $name with cmake (log: $bdir/*.log)"
  cmake -S "$src" -B "$bdir" -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF -DCMAKE_INSTALL_PREFIX="$VENV" \
    -DPython3_EXECUTABLE="$VPY" "$@" >"$bdir/configure.log" 2>&1 || { tail -40 "$bdir/configure.log"; exit 1; }
  cmake --build "$bdir" -j "$JOBS" >"$bdir/build.log" 2>&1 || { tail -40 "$bdir/build.log"; exit 1; }
  cmake --install "$bdir" >"$bdir/install.log" 2>&1 || { tail -40 "$bdir/install.log"; exit 1; }
}

# A message package that is not on PyPI, generated locally from its .msg files: package.xml and CMakeLists.txt
# written here, built when its inputs changed. The .msg texts are upstream's, so the type hashes are upstream's.
local_interfaces() {  # name version license description msg_dir dependency...
  local name=$1 version=$2 license=$3 description=$4 msgs=$5; shift 5
  local src=$BUILD/src/$name dep depends='' finds='' key
  rm -rf "$src/msg"
  mkdir -p "$src/msg"
  cp "$msgs"/*.msg "$src/msg/"
  for dep in "$@"; do
    depends+="  <depend>$dep</depend>"$'\n'
    finds+="find_package($dep REQUIRED)"$'\n'
  done
  cat >"$src/package.xml" <<XML
<?xml version="1.0"?>
<package format="3">
  <name>$name</name>
  <version>$version</version>
  <description>$description, generated locally for pip-only ROS 2 environments.</description>
  <maintainer email="lsm_ros@example.org">lsm_ros</maintainer>
  <license>$license</license>
  <buildtool_depend>ament_cmake</buildtool_depend>
  <buildtool_depend>rosidl_default_generators</buildtool_depend>
${depends}  <member_of_group>rosidl_interface_packages</member_of_group>
  <export><build_type>ament_cmake</build_type></export>
</package>
XML
  cat >"$src/CMakeLists.txt" <<CMAKE
cmake_minimum_required(VERSION 3.8)
project($name)
find_package(ament_cmake REQUIRED)
find_package(rosidl_default_generators REQUIRED)
${finds}file(GLOB MESSAGES RELATIVE \${CMAKE_CURRENT_SOURCE_DIR} msg/*.msg)
rosidl_generate_interfaces(\${PROJECT_NAME} \${MESSAGES} DEPENDENCIES $*)
ament_export_dependencies(rosidl_default_runtime)
ament_package()
CMAKE
  key=$(hash_of "$src"/msg/*.msg "$src/CMakeLists.txt" "$src/package.xml" "$STAMPS/wheels")
  if stamp_ok "$name" "$key" && "$VPY" -c "import $name.msg" 2>/dev/null; then
    say "$name up to date"
  else
    build_interfaces "$name" "$src"
    stamp_set "$name" "$key"
  fi
}

# tf2_msgs/TFMessage (to publish /tf): its one-line definition, the same text as upstream's.
TF2_MSGS=$BUILD/src/tf2_msgs_definitions
mkdir -p "$TF2_MSGS"
printf '%s\n' 'geometry_msgs/TransformStamped[] transforms' >"$TF2_MSGS/TFMessage.msg"
local_interfaces tf2_msgs 0.0.0 BSD-3-Clause 'tf2_msgs/TFMessage' "$TF2_MSGS" geometry_msgs
# vision_msgs: the message definitions of its Kilted release, kept verbatim in scripts/vision_msgs/msg
# (provenance: scripts/vision_msgs/README.md).
local_interfaces vision_msgs 4.2.0 Apache-2.0 'vision_msgs 4.2.0 (ros-perception/vision_msgs)' \
  "$ROOT/scripts/vision_msgs/msg" std_msgs geometry_msgs

# This package's own msg/ and srv/ (the same CMakeLists.txt that colcon uses on a ROS workstation; here
# only the interfaces are built and the Python package is installed by pip below).
LSM_KEY=$(hash_of "$ROOT"/msg/*.msg "$ROOT"/srv/*.srv "$ROOT/CMakeLists.txt" "$ROOT/package.xml" "$STAMPS/tf2_msgs" "$STAMPS/vision_msgs")
if stamp_ok lsm_ros_interfaces "$LSM_KEY" && "$VPY" -c 'import lsm_ros.msg, lsm_ros.srv' 2>/dev/null; then
  say "lsm_ros interfaces up to date"
else
  build_interfaces lsm_ros "$ROOT" -DLSM_ROS_INTERFACES_ONLY=ON
  # rosidl may write an empty lsm_ros/__init__.py into site-packages; drop it so that the source package
  # (installed editable below) stays the package and finds the generated lsm_ros.msg through its __path__.
  # rosidl also writes an egg-info that pip would take for an installed "lsm_ros" distribution (and delete
  # the generated files with it when installing the package): keep only the generated modules.
  SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  if [ -f "$SITE/lsm_ros/__init__.py" ] && [ ! -s "$SITE/lsm_ros/__init__.py" ]; then rm -f "$SITE/lsm_ros/__init__.py"; fi
  rm -rf "$SITE"/lsm_ros-*.egg-info
  stamp_set lsm_ros_interfaces "$LSM_KEY"
fi

# ------------------------------------------------------------------------------------------------ package
PKG_KEY=$(hash_of "$ROOT/setup.py" "$ROOT/setup.cfg")
if stamp_ok package "$PKG_KEY" && [ -x "$VENV/bin/lsm-ros" ] && [ -x "$VENV/bin/lsm_node" ]; then
  say "lsm_ros package installed (editable)"
else
  say "installing lsm_ros (editable) with the console commands lsm-ros and lsm_node"
  mkdir -p "$BUILD"
  "$VPY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" --config-settings editable_mode=compat \
    >"$BUILD/pip_install_package.log" 2>&1 || { tail -40 "$BUILD/pip_install_package.log"; exit 1; }
  stamp_set package "$PKG_KEY"
fi

# ------------------------------------------------------------------------------------------------ check
say "checking imports"
"$VPY" - <<'EOF'
import lsm_ros.compat  # noqa: F401  (torchvision on CPU torch)
import torch, timm, open_clip, rclpy, sensor_msgs.msg, tf2_msgs.msg, vision_msgs.msg, lsm_ros.msg, lsm_ros.srv  # noqa
import colcon_core  # noqa: F401  (colcon: the workstation build of test/test_colcon_build.py)
print(f'[setup] ok: torch {torch.__version__} (cuda {torch.cuda.is_available()}), timm {timm.__version__}, '
      f'open_clip {open_clip.__version__}, rclpy, tf2_msgs, vision_msgs, lsm_ros.msg, lsm_ros.srv, colcon')
EOF
say "done: activate with 'source .venv/bin/activate', or use 'make demo' / 'make test'"
