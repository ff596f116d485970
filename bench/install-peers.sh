#!/usr/bin/env bash
# Install what the benchmarks compare against (idempotent: only what is missing), as root on
# Debian/Ubuntu: redis-server (the Redis-backed API), Open MPI + mpi4py (mpi), torch's CPU wheel
# (gloo), moto (the S3-compatible server of the s3 backend), matplotlib (plots).
#   bench/install-peers.sh            # then: python bench/comm.py / bench/sort.py / ...
# The benchmarks start and stop the servers themselves; this only installs.
set -euo pipefail

apt_missing=()
for pkg in redis-server openmpi-bin libopenmpi-dev "$@"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || apt_missing+=("$pkg")
done
if ((${#apt_missing[@]})); then
  echo "installing Debian packages: ${apt_missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${apt_missing[@]}" >/dev/null
fi
python -c "import mpi4py" 2>/dev/null || pip install -q mpi4py
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
python -c "import moto.server, redis, matplotlib" 2>/dev/null || pip install -q 'moto[server]>=5.0' 'redis>=5.0' 'matplotlib>=3.7'
