"""The README's commands and Python API section stay true."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_python_api_snippet_runs(tmp_path):
    section = README.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stopped at EOS:" in r.stdout
    assert (tmp_path / "runs/readme/policy_adapter/adapter_config.json").is_file()


def test_readme_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    for target in re.findall(r"make ([a-z][a-z-]*)", README):
        assert re.search(rf"^{target}:", makefile, re.M), f"README mentions `make {target}`, Makefile lacks it"
    assert "make test" in (ROOT / ".ci/run").read_text()


def test_cli_plan_runs_for_the_presets():
    for preset in ("llava-v1.5-7b", "llava-v1.5-13b"):
        r = subprocess.run([sys.executable, "-m", "factrl.trainers.cli", "plan", "--config", preset],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert '"fits": true' in r.stdout.splitlines()[-1]


def test_cli_data_shapes_writes_the_formats(tmp_path):
    r = subprocess.run([sys.executable, "-m", "factrl.trainers.cli", "data", "shapes", "--out", str(tmp_path / "d"),
                        "--n", "6", "--seed", "3"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for f in ("sft.json", "preference.json", "preference_eval.json", "image_to_caption.json", "ppo_prompts.json"):
        assert (tmp_path / "d" / f).is_file(), f
    bad = subprocess.run([sys.executable, "-m", "factrl.trainers.cli", "sft", "sft.nope=1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "'sft.nope'" in bad.stderr
