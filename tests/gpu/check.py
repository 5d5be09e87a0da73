"""GPU readiness check: one script, one GPU, under 8 minutes; prints one table.

Run on a GPU machine: `.venv/bin/python tests/gpu/check.py [--peak-tflops 989] [--budget-s 420]`.
Reduced CPU mode (what tests/test_gpu_check.py runs, so that the script cannot rot): `--cpu` (tiny preset,
short sequences, a tiny Emu3 VQ, fp32; flex_attention's backward does not exist on CPU in torch 2.13).

Rows of the table:
1. Training parity: the same model, batches and seed trained for a few steps through the trainer's DeepSpeed
   engine (`train.trainer.build_engine`: bf16 on GPU) with sdpa (dense block mask) and with flex_attention
   (BlockMask, forward and backward): the per-step losses and step-1 gradient norms of both, and their largest
   difference.
2. Throughput: the `qwen2-0.5b` preset at sequence length 4,096, fold 2x8, stage 1, packed und + gen batches,
   flex_attention, ZeRO-2 bf16 (infra/deepspeed/zero2_gpu_bf16.json): tokens/s, TFLOP/s, MFU and peak memory;
   then the `paper` preset (3.6 B) the same way when the GPU's free memory allows.
   Model FLOPs are counted from the batch, not the hardware: every Linear on the rows it computes (forward 2,
   input gradient 2, weight gradient 2 only where the stage trains that weight, so stage 1's frozen text FFNs
   count 4 per parameter and row), attention scores within documents only (3x the forward). MFU = those
   FLOPs per second / the GPU's dense bf16 peak (`--peak-tflops`; H100/H200: 989).
3. VQ: Emu3's real-size VQ (random weights) encoding 512-px images, transformers' reference encode (2D encoder
   on 4 temporal copies) against ours (`VQTokenizer.encode`, 2D once), alternating rounds; codes compared.
A section that fails prints FAILED with the error and the script exits 1; one that the time budget or the
memory cannot hold prints `skipped` with the reason.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model.batch import PackedBatch  # noqa: E402
from model.config import preset_config  # noqa: E402

PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}  # dense bf16, vendor figures

GPU = dict(preset="qwen2-0.5b", overrides={}, seq=4096, parity_steps=3, warmup=2, steps=8, paper=True,
           vq_size=512, vq_batch=4, vq_rounds=3, zero="infra/deepspeed/zero2_gpu_bf16.json")
CPU = dict(preset="tiny", overrides={}, seq=160, parity_steps=2, warmup=1, steps=1, paper=False,
           vq_size=32, vq_batch=2, vq_rounds=1, zero="infra/deepspeed/zero2_cpu.json")


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []
        self.failed = False

    def add(self, check: str, value: str, detail: str = "") -> None:
        self.rows.append((check, value, detail))
        print(f"  {check}: {value} {detail}", flush=True)

    def fail(self, check: str, error: BaseException) -> None:
        self.failed = True
        self.add(check, "FAILED", f"{type(error).__name__}: {str(error)[:300]}")

    def render(self) -> str:
        lines = ["| check | value | detail |", "|---|---|---|"]
        lines += [f"| {c} | {v} | {d} |" for c, v, d in self.rows]
        return "\n".join(lines)


# ---- batches --------------------------------------------------------------------------------------


def packed_batch(cfg, seq: int, task: str, seed: int) -> PackedBatch:
    """One row of `seq` slots packed with whole documents of `task` ("und": image then caption targets;
    "gen": prompt then image code targets), random ids and codes; the rest empty slots."""
    g = torch.Generator().manual_seed(seed)
    n, k = cfg.blocks_per_image, cfg.fold_geometry.size
    low, high = 10, min(cfg.special_token_ids.values())  # text ids below our special tokens
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else 1
    boi, eoi, img = cfg.token_id("<boi>"), cfg.token_id("<eoi>"), cfg.token_id("<img>")
    ids, pos, docs, labels, is_img, target = [], [], [], [], [], []
    d = 0
    while True:
        text = torch.randint(low, high, (16,), generator=g).tolist()
        if task == "gen":
            doc = [bos] + text + [boi] + [img] * n + [eoi]
            lab = [-100] * len(doc)
            im = [False] * (len(text) + 2) + [True] * n + [False]
        else:
            doc = [bos, boi] + [img] * n + [eoi] + text
            lab = [-100] * (n + 3) + text
            im = [False, False] + [True] * n + [False] * (1 + len(text))
        if len(ids) + len(doc) > seq:
            break
        ids += doc
        labels += lab
        is_img += im
        target += [m and task == "gen" for m in im]
        pos += list(range(len(doc)))
        docs += [d] * len(doc)
        d += 1
    if d == 0:
        raise ValueError(f"sequence length {seq} holds no {task} document of {n + 20} tokens")
    pad = seq - len(ids)
    ids += [cfg.pad_token_id or 0] * pad
    labels += [-100] * pad
    is_img += [False] * pad
    target += [False] * pad
    pos += [0] * pad
    docs += [-1] * pad
    n_img = sum(is_img)
    t = lambda x, dt=torch.long: torch.tensor([x], dtype=dt)  # noqa: E731
    return PackedBatch(t(ids), t(pos), t(docs), t(labels), t(is_img, torch.bool),
                       torch.randint(0, cfg.codebook_size, (n_img, k), generator=g), t(target, torch.bool),
                       [["check"] * d], task)


# ---- model FLOPs of one micro-batch -----------------------------------------------------------------


def step_flops(model, batch: PackedBatch) -> float:
    """Training FLOPs of one forward + backward on `batch` (see the module docstring)."""
    cfg = model.config
    real = batch.document_ids >= 0
    n_img = int(batch.image_mask.sum())
    n_pos = int(real.sum())
    n_txt = n_pos - n_img
    n_txt_targets = int((batch.labels[:, 1:] != -100).sum())
    n_blocks = int(batch.image_targets.sum())
    k = cfg.fold_geometry.size

    def lin(module, rows: int) -> float:
        total = 0.0
        for m in module.modules():
            if isinstance(m, torch.nn.Linear):
                p = m.weight.numel()
                total += 2 * p * rows * (2 + (1 if m.weight.requires_grad else 0))
        return total

    flops = 0.0
    for layer in model.model.layers:
        flops += lin(layer.self_attn, n_pos) + lin(layer.mlp, n_txt) + lin(layer.image_mlp, n_img)
    q_dim = cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
    pairs = 0
    for b in range(batch.document_ids.shape[0]):
        _, counts = torch.unique(batch.document_ids[b][real[b]], return_counts=True)
        pairs += int((counts * (counts + 1) // 2).sum())
    flops += cfg.num_hidden_layers * 3 * 4 * q_dim * pairs  # QK^T and AV, forward + 2x backward
    flops += lin(model.lm_head, n_txt_targets) + lin(model.model.fold_embed.mlp, n_img)
    head = model.unfold_head
    flops += lin(head.in_proj, n_blocks) + lin(head.layers, n_blocks * k) + lin(head.classifier, n_blocks * k)
    return flops


# ---- sections ---------------------------------------------------------------------------------------


def build(preset: str, overrides: dict, device: str, seed: int = 0):
    from model.modeling import SynerGenVLForCausalLM

    torch.manual_seed(seed)
    cfg = preset_config(preset, **overrides)
    with torch.device(device):
        return SynerGenVLForCausalLM(cfg)


def engine_for(model, zero_json: str, stage: int, cpu: bool):
    """The trainer's DeepSpeed engine (AdamW of the stage, bf16 on GPU) around `model`."""
    from train.config import TrainConfig
    from train.trainer import build_engine, init_distributed

    init_distributed()
    model.set_stage(stage)
    cfg = TrainConfig(model="check", mixture="unused", steps=10, output_dir=tempfile.gettempdir(), deepspeed=str(ROOT / zero_json),
                      stage=stage, precision="fp32" if cpu else "bf16").resolved()
    return build_engine(cfg, model, ("und", "gen"))


def run_steps(engine, batches: list[dict[str, PackedBatch]], device: str) -> tuple[list[float], list[float | None], list[float]]:
    """Train one step per item (an und and a gen micro-batch, as the trainer does): losses, grad norms, seconds."""
    losses, norms, seconds = [], [], []
    for item in batches:
        sync(device)
        t = time.perf_counter()
        total = 0.0
        for task in ("und", "gen"):
            out = engine(item[task].to(engine.device))
            engine.backward(out.loss)
            total += float(out.loss.detach())
            engine.step()
        sync(device)
        seconds.append(time.perf_counter() - t)
        losses.append(total / 2)
        norm = engine.get_global_grad_norm()
        norms.append(float(norm) if norm is not None else None)
    return losses, norms, seconds


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    """Return what the caller's deleted model and engine held (call after `del`)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def batches_for(cfg, seq: int, n: int, seed: int) -> list[dict[str, PackedBatch]]:
    return [{task: packed_batch(cfg, seq, task, seed + 2 * i + j) for j, task in enumerate(("und", "gen"))} for i in range(n)]


def parity(p: dict, device: str, cpu: bool, table: Table) -> None:
    label = "fp32, CPU" if cpu else "bf16"
    results = {}
    for impl in ("sdpa", "flex_attention"):
        model = build(p["preset"], p["overrides"], device)
        model.config._attn_implementation = impl
        batches = batches_for(model.config, p["seq"], p["parity_steps"], seed=100)
        if cpu and impl == "flex_attention":
            # torch 2.13 has no flex_attention backward on CPU: compare the forward losses only.
            model.eval()
            with torch.no_grad():
                losses = [sum(float(model(item[t]).loss) for t in ("und", "gen")) / 2 for item in batches[:1]]
            results[impl] = (losses, [None])
            table.add(f"train parity ({label}): {impl} losses", fmt_list(losses),
                      "forward only: flex_attention has no backward on CPU (torch 2.13)")
            del model
            free_memory()
            continue
        engine = engine_for(model, p["zero"], 1, cpu)
        losses, norms, _ = run_steps(engine, batches, device)
        results[impl] = (losses, norms)
        table.add(f"train parity ({label}): {impl} losses", fmt_list(losses),
                  f"{p['preset']}, seq {p['seq']}, stage 1, step-1 grad norm {fmt(norms[0])}")
        del engine, model
        free_memory()
    (a, na), (b, nb) = results["sdpa"], results["flex_attention"]
    n = min(len(a), len(b))
    diff = max(abs(x - y) for x, y in zip(a[:n], b[:n]))
    detail = f"over {n} step(s); |loss| ~{abs(a[0]):.3g}"
    if na[0] is not None and nb[0] is not None:
        detail += f"; step-1 grad norm diff {abs(na[0] - nb[0]):.3g}"
    table.add(f"train parity ({label}): max |loss diff| flex vs sdpa", f"{diff:.3g}", detail)


def throughput(name: str, preset: str, overrides: dict, p: dict, device: str, cpu: bool, peak: float | None, table: Table) -> None:
    cfg = preset_config(preset, **overrides)
    if device == "cuda":
        from model.config import parameter_counts

        need = parameter_counts(cfg)["total"] * 16 * 1.3  # bf16 weights+grads, fp32 master+Adam, headroom
        free, _ = torch.cuda.mem_get_info()
        if need > free:
            table.add(f"{name}: tokens/s", "skipped", f"needs ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free")
            return
        torch.cuda.reset_peak_memory_stats()
    model = build(preset, overrides, device)
    model.config._attn_implementation = "sdpa" if cpu else "flex_attention"
    engine = engine_for(model, p["zero"], 1, cpu)
    batches = batches_for(model.config, p["seq"], p["warmup"] + p["steps"], seed=7)
    _, _, seconds = run_steps(engine, batches, device)
    timed = batches[p["warmup"]:]
    secs = seconds[p["warmup"]:]
    tokens = sum(item[t].n_real_tokens for item in timed for t in ("und", "gen"))
    flops = sum(step_flops(model, item[t]) for item in timed for t in ("und", "gen"))
    wall = sum(secs)
    tflops = flops / wall / 1e12
    where = f"{preset}, seq {p['seq']}, fold {'x'.join(map(str, cfg.fold))}, stage 1, {Path(p['zero']).stem}, {len(secs)} steps x (und + gen)"
    table.add(f"{name}: tokens/s", f"{tokens / wall:,.0f}", f"{where}; median step {statistics.median(secs):.3f} s")
    table.add(f"{name}: model TFLOP/s", f"{tflops:.3g}", "counted from the batches (module docstring)")
    table.add(f"{name}: MFU", f"{100 * tflops / peak:.3g}%" if peak else "n/a", f"of {peak:g} TFLOP/s" if peak else "no peak known (--peak-tflops)")
    if device == "cuda":
        table.add(f"{name}: peak memory", f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", "")
    del engine, model
    free_memory()


def vq_encode(p: dict, device: str, cpu: bool, table: Table) -> None:
    from transformers import Emu3VQVAE, Emu3VQVAEConfig

    from model.vq import VQTokenizer

    torch.manual_seed(0)
    if cpu:  # the real layout (4 temporal copies, attention) at a size a test can afford
        config = Emu3VQVAEConfig(codebook_size=64, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 2],
                                 num_res_blocks=1, attn_resolutions=[1], temporal_downsample_factor=4, hidden_size=64)
        what = "tiny Emu3 VQ (CPU mode)"
    else:
        config = Emu3VQVAEConfig()
        what = "real-size Emu3 VQ (271 M, random weights)"
    with torch.device(device):
        vq = VQTokenizer(Emu3VQVAE(config))
    size, batch = p["vq_size"], p["vq_batch"]
    pix = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    sizes = torch.tensor([[size, size]] * batch)

    @torch.no_grad()
    def reference():
        return torch.stack(list(vq.model.encode(pix, image_sizes=sizes).image_tokens))

    same = torch.equal(reference(), vq.encode(pix))  # and the warm-up of both
    times: dict[str, list[float]] = {"reference": [], "2D-once": []}
    for _ in range(p["vq_rounds"]):
        for name, fn in (("reference", reference), ("2D-once", lambda: vq.encode(pix))):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    rate = {k: batch / statistics.median(v) for k, v in times.items()}
    detail = f"{what}, fp32, batch {batch}, median of {p['vq_rounds']} alternating round(s)"
    table.add(f"VQ encode {size} px: reference images/s", f"{rate['reference']:.2f}", detail)
    table.add(f"VQ encode {size} px: 2D-once images/s", f"{rate['2D-once']:.2f}", f"speedup {rate['2D-once'] / rate['reference']:.2f}x")
    table.add(f"VQ encode {size} px: codes equal", str(same), "2D-once vs reference, same images")
    del vq
    free_memory()


def fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def fmt_list(xs: list[float]) -> str:
    return ", ".join(f"{x:.4f}" for x in xs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="reduced CPU mode (tiny preset, tiny VQ; what the test suite runs)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU (default: by its name)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="sections not started by then are skipped")
    ap.add_argument("--no-paper", action="store_true", help="skip the paper-preset throughput")
    args = ap.parse_args(argv)

    cpu = args.cpu
    if not cpu and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu for the reduced CPU mode", file=sys.stderr)
        return 2
    device = "cpu" if cpu else "cuda"
    p = CPU if cpu else GPU
    peak = args.peak_tflops
    if peak is None and not cpu:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    start = time.perf_counter()
    where = "CPU (reduced mode)" if cpu else torch.cuda.get_device_name()
    print(f"GPU readiness check on {where}, torch {torch.__version__}", flush=True)
    table = Table()
    sections = [
        ("train parity", lambda: parity(p, device, cpu, table)),
        (f"{p['preset']} throughput", lambda: throughput(p["preset"], p["preset"], p["overrides"], p, device, cpu, peak, table)),
    ]
    if p["paper"] and not args.no_paper:  # not in CPU mode: the same code as the row above, 3.6 B parameters
        sections.append(("paper (ZeRO-2) throughput", lambda: throughput("paper (ZeRO-2)", "paper", {}, p, device, cpu, peak, table)))
    sections.append(("VQ encode", lambda: vq_encode(p, device, cpu, table)))
    for name, run in sections:
        if time.perf_counter() - start > args.budget_s:
            table.add(name, "skipped", f"time budget of {args.budget_s:.0f} s spent")
            continue
        t = time.perf_counter()
        try:
            run()
        except Exception as e:  # noqa: BLE001 - a readiness check reports every section, then fails
            table.fail(name, e)
        print(f"[{name}: {time.perf_counter() - t:.0f} s]", flush=True)
    print(f"\n{table.render()}\n\nwall time {time.perf_counter() - start:.0f} s", flush=True)
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
