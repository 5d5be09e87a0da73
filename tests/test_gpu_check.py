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

    # Throughput: the tiny preset in CPU mode (the paper preset's rows run the same code, on a GPU only).
    assert float(rows["tiny: tokens/s"][0].replace(",", "")) > 0
    assert "zero2" in rows["tiny: tokens/s"][1]
    tflops = float(rows["tiny: model TFLOP/s"][0])
    mfu = float(rows["tiny: MFU"][0].rstrip("%")) / 100
    assert tflops > 0 and math.isclose(mfu, tflops / 0.05, rel_tol=0.02)

    assert float(rows["VQ encode 32 px: reference images/s"][0]) > 0
    assert float(rows["VQ encode 32 px: 2D-once images/s"][0]) > 0
    assert rows["VQ encode 32 px: codes equal"][0] == "True"


def load_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tests/gpu/check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mfu_flops_are_the_matmuls_a_step_computes():
    """The check's model FLOPs = torch's own count of the Linear matmuls of a forward + backward (frozen weights
    get no weight gradient) + attention within documents; on a gen batch with no empty slot."""
    from collections import Counter

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    check = load_check()
    for stage in (1, "sft"):
        model = check.build("tiny", {}, "cpu")
        model.set_stage(stage)
        model.config._attn_implementation = "sdpa"  # not counted by FlopCounterMode on CPU: matmuls only
        batch = check.packed_batch(model.config, 135, "gen", seed=3)  # 5 documents of 27 tokens, no padding
        assert batch.n_real_tokens == 135 and int(batch.image_targets.sum()) == 5 * 8
        counter = FlopCounterMode(display=False)
        with counter:
            model(batch).loss.backward()
        counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
        assert set(counts) == {"aten.mm", "aten.addmm"}
        lengths = Counter(batch.document_ids[0].tolist()).values()
        cfg = model.config
        attention = cfg.num_hidden_layers * 3 * 4 * cfg.hidden_size * sum(n * (n + 1) // 2 for n in lengths)
        assert check.step_flops(model, batch) == counts["aten.mm"] + counts["aten.addmm"] + attention
        if stage == 1:
            stage1 = check.step_flops(model, batch)
    assert check.step_flops(model, batch) > stage1  # sft adds the frozen weights' gradients
