#!/usr/bin/env bash
# Run HERE (a machine with the package registry) before tools/gpu_check.sh on a GPU machine without network:
# downloads, into ./.whl (git-ignored), the Python 3.12 wheels the GPU image lacks and the check needs.
# megatron-core (2.4 MB) for the Megatron trainer smoke run; Ray (~80 MB) does not fit the 64 MiB a device call can
# carry, so the full `opd-train` smoke run happens only where Ray is installed (gpu_check.sh says so when it is not).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  megatron-core==0.19.2
ls -la .whl
