"""tests/gpu/check.py, the GPU readiness check, in its reduced CPU mode: every section runs and reports."""

import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def table_rows(stdout: str) -> dict[str, tuple[str, str]]:
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and len(cells) == 3 and cells[0] not in ("check", "---"):
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def test_gpu_check_runs_every_section_in_cpu_mode():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a one-process DeepSpeed group of its own
    proc = subprocess.run([sys.executable, "tests/gpu/check.py", "--cpu", "--peak-tflops", "0.05", "--budget-s", "100000"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = table_rows(proc.stdout)
    assert not [k for k, (v, _) in rows.items() if v in ("FAILED", "skipped")], rows

    sdpa = [float(x) for x in rows["train parity (fp32, CPU): sdpa losses"][0].split(", ")]
    assert len(sdpa) == 2 and all(math.isfinite(x) and x > 0 for x in sdpa)
    flex = [float(x) for x in rows["train parity (fp32, CPU): flex_attention losses"][0].split(", ")]
    assert abs(flex[0] - sdpa[0]) < 1e-4  # the same first-step loss, before any optimizer step
    assert float(rows["train parity (fp32, CPU): max |loss diff| flex vs sdpa"][0]) < 1e-4

    for name in ("tiny", "paper (ZeRO-2)"):
        assert float(rows[f"{name}: tokens/s"][0].replace(",", "")) > 0
        assert "zero2" in rows[f"{name}: tokens/s"][1]
        tflops = float(rows[f"{name}: model TFLOP/s"][0])
        mfu = float(rows[f"{name}: MFU"][0].rstrip("%")) / 100
        assert tflops > 0 and math.isclose(mfu, tflops / 0.05, rel_tol=0.02)

    assert float(rows["VQ encode 32 px: reference images/s"][0]) > 0
    assert float(rows["VQ encode 32 px: 2D-once images/s"][0]) > 0
    assert rows["VQ encode 32 px: codes equal"][0] == "True"
