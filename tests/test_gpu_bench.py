"""The GPU benchmarks never rot: each one's `--smoke` run (tiny sizes, any device) in a subprocess prints one JSON
line with every key the full run reports, and sane values."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_smoke(script: str, *extra: str) -> dict:
    "Run `bench/<script> --smoke`; its last line of output, as JSON."
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--smoke", *extra], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines, f"{script} printed nothing; stderr:\n{done.stderr[-3000:]}"
    return json.loads(lines[-1])


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def share(x) -> bool:
    return isinstance(x, (int, float)) and 0 <= x <= 1


def check_device(result: dict):
    assert result["device"] in ("cpu", "cuda", "cuda:0", "mps") and result["device_name"]
    assert result["smoke"] is True
    on_gpu = result["device"].startswith("cuda")
    assert positive(result["peak_gpu_memory_gb"]) if on_gpu else result["peak_gpu_memory_gb"] is None


def test_gpu_pets_smoke():
    result = run_smoke("gpu_pets.py")
    assert result["bench"] == "gpu_pets" and result["images"] == 48 and result["cache_images"] == 48
    assert result["cached"] is True and positive(result["cache_build_seconds"])
    assert positive(result["img_per_s_frozen"]) and positive(result["img_per_s_unfrozen"])
    assert share(result["data_wait_share_frozen"]) and share(result["data_wait_share_unfrozen"])
    assert result["timed_batches"] >= 1 and result["pretrained"] in (True, False)
    assert result["precision"] in ("fp32", "bf16", "fp16")
    if result["device"] == "cpu":
        assert result["decode_max_diff"] == 0 and result["decode_mean_diff"] == 0   # the same decoder: the same pixels
    else:
        assert 0 <= result["decode_max_diff"] <= 255 and 0 <= result["decode_mean_diff"] < 5
    check_device(result)


def test_gpu_text_smoke():
    result = run_smoke("gpu_text.py")
    assert result["bench"] == "gpu_text" and result["vocab"] == 500 and result["bs"] == 16 and result["bptt"] == 24
    assert positive(result["tok_per_s"]) and share(result["data_wait_share"]) and result["timed_batches"] >= 1
    assert result["precision"] in ("fp32", "bf16", "fp16")
    check_device(result)


def test_gpu_lesson_pets_smoke_with_fp32_comparison():
    result = run_smoke("gpu_lesson_pets.py", "--compare-fp32")
    assert result["bench"] == "gpu_lesson_pets" and result["images"] == 40
    assert positive(result["seconds"]) and set(result["stage_seconds"]) == {"stage1", "stage2", "big"}
    assert all(positive(v) for v in result["stage_seconds"].values())
    rates = ("stage1_error_rate", "stage2_error_rate", "big_error_rate")
    assert all(share(result[k]) and share(result["fp32"][k]) for k in rates)
    assert positive(result["fp32"]["seconds"]) and result["settings"]["arch"] == "resnet18"
    assert result["pretrained"] or "random weights" in result["note"]
    check_device(result)


@pytest.mark.parametrize("script", ["gpu_pets.py", "gpu_text.py", "gpu_lesson_pets.py"])
def test_each_bench_says_what_it_measures(script):
    text = (ROOT / "bench" / script).read_text()
    assert text.startswith('"""') and "--smoke" in text and "Prints one JSON line." in text
