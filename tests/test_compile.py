"""Every Triton kernel compiles for sm_90 and sm_80 without a GPU (kernels/compile_check.py).

The check runs in a subprocess: the suite imports the kernels under TRITON_INTERPRET=1, where
they are interpreter objects that cannot be compiled. It uses a fresh Triton cache so each run
really compiles. Skipped, with the reason, when the installed triton has no CUDA backend or ptxas.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def _check(tmp_path, *args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "factrl.kernels.compile_check", "--json", str(report), *args],
                          env=env, capture_output=True, text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    assert summary is not None, f"compile_check printed no summary (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    if "skipped" in summary:
        pytest.skip(summary["skipped"])
    assert proc.returncode == 0 and not summary["problems"], "\n".join(summary["problems"]) or proc.stderr[-3000:]
    return json.loads(report.read_text())


def _jit_functions():
    """(file, FunctionDef) of every @triton.jit function in kernels/*.py."""
    for path in sorted(KERNELS.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
                yield path.name, node


def test_every_kernel_variant_compiles_for_sm90_and_sm80(tmp_path):
    rep = _check(tmp_path)
    kernels = {fn.name for _, fn in _jit_functions() if fn.name.endswith("_kernel")}
    assert {r["kernel"] for r in rep["rows"]} == kernels, "a kernel in kernels/ is missing from compile_check"
    assert {r["arch"] for r in rep["rows"]} == {80, 90}
    assert rep["failed"] == 0
    # every dtype the launchers take reached every nf4/logprobs kernel
    for k in ("_nf4_lora_mm_kernel", "_nf4_lora_gemv_kernel", "_nf4_lora_proj_kernel", "_logprobs_fwd_kernel"):
        tags = " ".join(r["variant"] for r in rep["rows"] if r["kernel"] == k)
        assert all(d in tags for d in ("f32", "f16", "bf16")), k
    # the shared-memory estimate covered every autotune config, and sm_80 keeps at least one of each list
    by_list = {}
    for e in rep["estimates"]:
        by_list.setdefault((e["kernel"], e["variant"]), []).append(e["fits_sm80"])
    assert by_list and all(any(f) for f in by_list.values())
    # ... and every autotune config's shared memory is known on both architectures: from the
    # table (checked against the compiler by the sweep), or compiled in this run
    compiled = {(r["kernel"], r["variant"], r["arch"], r["config"]) for r in rep["rows"]}
    unknown = [(e["kernel"], e["variant"], a, e["config"]) for e in rep["estimates"] for a in (80, 90)
               if e[f"estimate_sm{a}"] is None and (e["kernel"], e["variant"], a, e["config"]) not in compiled]
    assert not unknown, f"autotune configs neither in the table nor compiled: {unknown[:5]}"


@pytest.mark.slow
def test_full_sweep_every_config_compiles(tmp_path):
    """``make compile-check``: every flag combination, every autotune config of the main variants (644 compiles)."""
    rep = _check(tmp_path, "--full", timeout=3 * 3600)
    assert rep["failed"] == 0


def _plan(code: str) -> dict:
    """Run ``code`` (which prints one JSON line) with compile_check importable (no interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_quick_check_compiles_what_the_table_does_not_measure():
    # The quick check compiles one config per variant and takes every other autotune config's
    # shared memory from kernels/_shared_table.py. That table covers every list (else the pruning
    # keeps a config blindly and the quick check must compile it: slower, and the check says so),
    # and a config added to a list without re-measuring is compiled, so an over-limit one fails.
    out = _plan("""
import json
from factrl.kernels import compile_check as C
vs = C.all_variants(False)
extra = {f"{v.tag} sm_{a}": C._configs_to_compile(v, a, False) for v in vs for a in C.ARCHS
         if C._configs_to_compile(v, a, False) != [C.representative(v)]}
v = next(v for v in vs if v.tag.startswith("gemv-bf16-lorabf16"))
v.configs.append(({"BLOCK_N": 256, "BLOCK_K": 256}, 8, 4))
print(json.dumps({"extra": extra, "added": {a: C._configs_to_compile(v, a, False) for a in C.ARCHS},
                  "rep": C.representative(v), "n": len(v.configs)}))
""")
    assert not out["extra"], f"configs missing from kernels/_shared_table.py (rerun --write-table): {out['extra']}"
    assert out["added"] == {str(a): [out["rep"], out["n"] - 1] for a in (90, 80)}


def test_no_constexpr_goes_unused():
    """An unused constexpr still keys the compile cache: each new value recompiles (and, in an
    autotune key, re-benchmarks) every config for nothing. M_BUCKET was one."""
    bad = []
    for fname, fn in _jit_functions():
        used = {n.id for stmt in fn.body for n in ast.walk(stmt) if isinstance(n, ast.Name)}
        for a in fn.args.args:
            if a.annotation is not None and "constexpr" in ast.unparse(a.annotation) and a.arg not in used:
                bad.append(f"{fname}:{fn.name}({a.arg})")
    assert not bad, f"constexpr parameters never read in the body: {bad}"


class _FakeCuda:
    """A CUDA tensor as the pruning sees it: a device index and an element width."""

    is_cuda = True

    def __init__(self, nbytes):
        self.nbytes, self.device = nbytes, type("D", (), {"index": 0})()

    def element_size(self):
        return self.nbytes


def test_pruning_drops_exactly_the_configs_over_the_device_limit(monkeypatch):
    import triton

    from factrl.kernels import _limits
    from factrl.kernels import logprobs as LP
    from factrl.kernels import nf4_lora as NL

    # 128/128/128 x 3 stages (dropped from the list) needs 174 KB on sm_80, 207 KB on sm_90 (the table)
    big = triton.Config({"BLOCK_M": 128, "BLOCK_J": 128, "BLOCK_L": 128, "GROUP_M": 8}, num_warps=8, num_stages=3)
    mm = (NL._PRUNE_MM, NL.GPU_MM_CONFIGS + [big], "_nf4_lora_mm_kernel")
    cases = [(*mm, "dx", {"a_ptr": 2, "lw_ptr": 2}, {"FWD": False}),
             (*mm, "fwd", {"a_ptr": 2, "lw_ptr": 2}, {"FWD": True}),
             (*mm, "fwd", {"a_ptr": 4, "lw_ptr": 4}, {"FWD": True}),
             (*mm, "dx", {"a_ptr": 4, "lw_ptr": 4}, {"FWD": False}),  # fp32 256/128/64: 169 KB on sm_80
             (NL._PRUNE_GEMV, NL.GPU_GEMV_CONFIGS, "_nf4_lora_gemv_kernel", "-", {"x_ptr": 4, "lw_ptr": 4}, {}),
             (LP._PRUNE_FWD, [triton.Config(dict(BLOCK_N=n, BLOCK_V=v, BLOCK_K=k), num_warps=w, num_stages=s)
                              for n, v, k, w, s in LP._GEMM_CONFIGS],
              "_logprobs_fwd_kernel", "-", {"h_ptr": 4, "w_ptr": 4}, {})]
    dropped_on_sm80 = 0
    for prune, configs, kernel, role, widths, kwargs in cases:
        args = {k: _FakeCuda(n) for k, n in widths.items()}
        a, b = widths.values()
        for arch in (80, 90):
            limit = _limits.SHARED_LIMIT[arch]
            monkeypatch.setattr(_limits, "device_arch_and_limit", lambda i, arch=arch, limit=limit: (arch, limit))
            sizes = [_limits.shared_bytes(kernel, role, c.kwargs, c.num_warps, c.num_stages, a, b, arch)
                     for c in configs]
            kept = prune(configs, args, **kwargs)
            assert kept == [c for c, s in zip(configs, sizes) if s is None or s <= limit], f"{kernel} sm_{arch}"
            assert kept
            dropped_on_sm80 += (len(configs) - len(kept)) if arch == 80 else 0
    # the big config (forward and dX in bf16), and fp32 dX 256/128/64 (169 KB; fp32 has no big-config entry)
    assert dropped_on_sm80 == 3
    import torch

    cpu = {"a_ptr": torch.zeros(1), "lw_ptr": torch.zeros(1)}  # the interpreter: nothing to prune
    assert NL._PRUNE_MM(NL.GPU_MM_CONFIGS, cpu, FWD=True) == NL.GPU_MM_CONFIGS
