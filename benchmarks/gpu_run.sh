#!/usr/bin/env bash
# One GPU run: install what is missing, run the GPU tests and every benchmark, and write logs and
# results to the folder given as the first argument (then commit its files to benchmarks/results/).
#   bash benchmarks/gpu_run.sh OUT_DIR
# On a machine without network, bring wheels (e.g. bitsandbytes) in ./.whl; they are installed first.
set -uo pipefail
out=${1:?usage: gpu_run.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
fi
export PYTHONPATH=${PYTHONPATH:-.}:.
# the package is imported from the checkout (factrl.* maps to the three folders)
python3 - <<'PY' >"$out/env.txt" 2>&1
import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())
PY
mkdir -p /tmp/factrl_pkg/factrl
for d in kernels model trainers; do ln -sfn "$PWD/$d" "/tmp/factrl_pkg/factrl/$d"; done
export PYTHONPATH=/tmp/factrl_pkg:$PYTHONPATH
python3 -m pytest tests -m gpu -q -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log"
python3 -m pytest tests/test_nf4_lora.py tests/test_logprobs.py tests/test_gae.py -q -p no:cacheprovider \
  2>&1 | tail -3 | tee "$out/kernel_tests.log"
python3 benchmarks/run_all.py 2>&1 | tee "$out/bench.log"
cp benchmarks/results/*"$(python3 -c 'import torch;print(torch.cuda.get_device_name().replace(" ","_"))')"* "$out"/ 2>/dev/null
echo "done: $out"
