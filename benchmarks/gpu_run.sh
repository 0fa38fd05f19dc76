#!/usr/bin/env bash
# One time-boxed GPU run: four phases, each under its own timeout and each writing its results to
# OUT as soon as it ends, then one summary JSON. Whole run <= 8 minutes on an H100/H200,
# installing carried wheels included. Commit OUT's files under benchmarks/results/ afterwards.
#
#   bash benchmarks/gpu_run.sh OUT_DIR
#
# Phases (seconds; each also stops when the total budget is spent):
#   env      60  install ./.whl/*.whl (no network: missing packages travel as wheels), versions, device
#   tests   150  the kernel test files on the GPU (every kernel vs its reference, bf16 included)
#   kernels 120  the kernel benchmarks (run_all.py --smoke: one LLaMA shape each; KERNEL_BENCH=full for all)
#   e2e     150  bench_ppo_step.py at LLaVA-1.5-7B shapes (E2E_ARGS to change the settings)
# OUT/phases.tsv gets one line per finished phase (name, exit code, seconds, timed out); OUT/summary.json
# is written last. Override the budgets with T_ENV, T_TESTS, T_KERNELS, T_E2E, T_TOTAL.
set -uo pipefail
out=${1:?usage: gpu_run.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
T_TOTAL=${T_TOTAL:-470}
start=$(date +%s)
printf "phase\trc\tseconds\ttimed_out\n" >"$out/phases.tsv"

# run NAME BUDGET CMD...: CMD under timeout min(BUDGET, what is left of T_TOTAL); stdout+stderr -> OUT/NAME.log
run() {
  local name=$1 budget=$2; shift 2
  local left=$(( T_TOTAL - ($(date +%s) - start) ))
  (( left < budget )) && budget=$left
  if (( budget <= 5 )); then
    printf "%s\t-\t0\tskipped\n" "$name" >>"$out/phases.tsv"; return
  fi
  local t0=$(date +%s)
  # timeout signals its whole process group: bash -c and every python under it stop together
  timeout -k 10 "$budget" bash -c '"$@"' _ "$@" >"$out/$name.log" 2>&1
  local rc=$?
  local timed=false; (( rc == 124 || rc == 137 )) && timed=true
  printf "%s\t%s\t%s\t%s\n" "$name" "$rc" "$(( $(date +%s) - t0 ))" "$timed" >>"$out/phases.tsv"
  echo "phase $name: rc=$rc $(( $(date +%s) - t0 ))s timed_out=$timed"
}

# --- env: wheels, the package from this checkout, versions ----------------------------------------
env_phase() {
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || return 1
  fi
  python3 - "$out/env.json" <<'PY'
import json, subprocess, sys, datetime, importlib.metadata as md
import torch, triton
def v(p):
    try:
        return md.version(p)
    except md.PackageNotFoundError:
        return None
sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
env = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
       "capability": list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None,
       "git_sha": sha, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       **{p: v(p) for p in ("torch", "triton", "transformers", "peft", "bitsandbytes", "flash-attn")}}
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env))
PY
}
[ -d /tmp/site ] || mkdir -p /tmp/site
# factrl.* maps to the three folders of this checkout (no pip install needed)
mkdir -p /tmp/factrl_pkg/factrl
for d in kernels model trainers; do ln -sfn "$PWD/$d" "/tmp/factrl_pkg/factrl/$d"; done
export PYTHONPATH=/tmp/site:/tmp/factrl_pkg:.${PYTHONPATH:+:$PYTHONPATH}
export out
export -f env_phase
run env "${T_ENV:-60}" env_phase

# --- tests: every kernel against its reference on the GPU (bf16 tensor cores included) -----------
run tests "${T_TESTS:-150}" python3 -m pytest tests/test_nf4_lora.py tests/test_logprobs.py tests/test_gae.py \
  -q -p no:cacheprovider --junitxml="$out/tests.xml"

# --- kernels: microbenchmarks, results appended as each one finishes -----------------------------
kernels_phase() {
  local args=(--smoke); [ "${KERNEL_BENCH:-smoke}" = full ] && args=()
  python3 benchmarks/run_all.py --only gae logprobs nf4_lora "${args[@]}"
  local rc=$?
  cp benchmarks/results/*-"$(python3 -c 'import torch;print(torch.cuda.get_device_name().replace(" ","_").replace("/","_"))')".* \
    "$out"/ 2>/dev/null
  return $rc
}
export -f kernels_phase
run kernels "${T_KERNELS:-120}" kernels_phase

# --- e2e: one PPO step at 7B shapes beside factrl plan ----------------------------------------------
# shellcheck disable=SC2086
run e2e "${T_E2E:-150}" python3 benchmarks/bench_ppo_step.py --results "$out" ${E2E_ARGS:---preset llava-v1.5-7b}

# --- summary ----------------------------------------------------------------------------------------
python3 - "$out" "$(( $(date +%s) - start ))" <<'PY'
import json, os, sys, xml.etree.ElementTree as ET
out, total = sys.argv[1], int(sys.argv[2])
s = {"seconds": total, "phases": {}}
try:
    s["env"] = json.load(open(os.path.join(out, "env.json")))
except (OSError, ValueError):
    s["env"] = None
for line in open(os.path.join(out, "phases.tsv")).read().splitlines()[1:]:
    name, rc, sec, timed = line.split("\t")
    s["phases"][name] = {"rc": None if rc == "-" else int(rc), "seconds": int(sec), "timed_out": timed == "true",
                         "skipped": timed == "skipped"}
try:
    r = ET.parse(os.path.join(out, "tests.xml")).getroot()
    r = r if r.tag == "testsuite" else r.find("testsuite")
    s["tests"] = {k: int(r.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
except (OSError, ET.ParseError, AttributeError):
    s["tests"] = None
def last_json(path):
    try:
        for line in reversed(open(path).read().splitlines()):
            if line.startswith("{"):
                return json.loads(line)
    except (OSError, ValueError):
        pass
    return None
k = last_json(os.path.join(out, "kernels.log"))
s["kernels"] = None if k is None else {"ran": k.get("ran"), "failed": k.get("failed"), "seconds": k.get("seconds")}
e = last_json(os.path.join(out, "e2e.log"))
s["e2e"] = None if e is None else e.get("table")
s["ok"] = bool(s["phases"]) and all(p["rc"] == 0 for p in s["phases"].values())
json.dump(s, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(json.dumps({k: s[k] for k in ("seconds", "phases", "tests", "ok")}))
PY
