"""Benchmark: a training step at 512x512 (64x64 codes) with fold 2x8 vs 2x4 vs none (1x1), FFN routing vs
blending, and the loss's peak memory with chunked vs unchunked logits (code classifier and LM head).

Run: `.venv/bin/python tests/benchmarks/bench_model.py [--part all|step|loss] [--hidden 256 --layers 2 --codebook 4096 --device cpu]`.
Each fold (and each loss configuration) runs in its own process so that peak memory (CUDA: max allocated;
CPU: peak RSS growth during the steps) belongs to it alone. Ratios are against fold 1x1 (no folding),
against the blend, and against the unchunked loss.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from model.batch import PackedBatch  # noqa: E402
from model.chunked_ce import chunked_cross_entropy, rows_per_chunk  # noqa: E402
from model.config import preset_config  # noqa: E402
from model.mmoe import blend_ffn, route_ffn  # noqa: E402
from model.modeling import SynerGenVLForCausalLM  # noqa: E402
from model.unfold_head import UnfoldHead  # noqa: E402


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _memory_base(cuda: bool) -> int:
    """Bytes in use now, after resetting the CUDA peak counter: the baseline of `_memory_peak`."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return _rss_bytes()


def _memory_peak(cuda: bool, base: int) -> int:
    """Peak bytes above `base` since `_memory_base` (CPU: the process's peak RSS, so one measurement per process)."""
    return (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base


def gen_batch(cfg, device) -> PackedBatch:
    """One generation sample: <s> prompt(8) <boi> IMG*n <eoi>, all blocks code targets."""
    n, k = cfg.blocks_per_image, cfg.fold_geometry.size
    ids = [1] + list(range(10, 18)) + [cfg.token_id("<boi>")] + [cfg.token_id("<img>")] * n + [cfg.token_id("<eoi>")]
    T = len(ids)
    img = torch.zeros(1, T, dtype=torch.bool)
    img[0, 10:10 + n] = True
    labels = torch.full((1, T), -100)
    b = PackedBatch(torch.tensor([ids]), torch.arange(T)[None], torch.zeros(1, T, dtype=torch.long), labels, img,
                    torch.randint(0, cfg.codebook_size, (n, k)), img.clone(), [["bench"]], "gen")
    return b.to(device)


def step_worker(fold, args, q) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = preset_config("tiny", vocab_size=1024, hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=4, num_key_value_heads=2, codebook_size=args.codebook, image_grid=[64, 64], fold=list(fold),
                        head_layers=args.head_layers, max_position_embeddings=8192)
    model = SynerGenVLForCausalLM(cfg).to(args.device)
    model.set_stage(1)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    batch = gen_batch(cfg, args.device)
    cuda = args.device.startswith("cuda")

    def step():
        loss = model(batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up (allocates optimizer state)
    base = _memory_base(cuda)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = _memory_peak(cuda, base)
    q.put({"fold": f"{fold[0]}x{fold[1]}", "positions": batch.input_ids.shape[1], "step_s": sorted(times)[len(times) // 2], "peak_mb": max(peak, 0) / 2**20})


def ffn_bench(args) -> tuple[float, float]:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = preset_config("tiny", hidden_size=args.hidden, intermediate_size=4 * args.hidden)
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    text, image = Qwen2MLP(cfg).to(args.device), Qwen2MLP(cfg).to(args.device)
    x = torch.randn(1, 4096, args.hidden, device=args.device, requires_grad=True)
    mask = torch.zeros(1, 4096, dtype=torch.bool, device=args.device)
    mask[0, 1024:3072] = True  # half image, half text

    def timed(fn) -> float:
        out = []
        for i in range(args.steps + 1):
            t = time.perf_counter()
            fn(x, mask, text, image).sum().backward()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if i:
                out.append(time.perf_counter() - t)
        return sorted(out)[len(out) // 2]

    return timed(route_ffn), timed(blend_ffn)


def loss_worker(kind: str, n: int, chunk_logits: int, args, q) -> None:
    """Forward + backward of the image loss (unfolding head on `n` images of 64x64 codes, fold 2x8, codebook
    `--loss-codebook`) or of the text loss (`n` targets over a `--loss-vocab` LM head); peak memory and time."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = preset_config("tiny", vocab_size=args.loss_vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                        num_attention_heads=4, num_key_value_heads=2, codebook_size=args.loss_codebook, image_grid=[64, 64],
                        fold=[2, 8], head_layers=args.head_layers, loss_chunk_logits=chunk_logits)
    k = cfg.fold_geometry.size
    if kind == "image":
        head = UnfoldHead(cfg).to(args.device)
        rows = n * cfg.blocks_per_image
        h = torch.randn(rows, args.hidden, device=args.device, requires_grad=True)
        codes = torch.randint(0, cfg.codebook_size, (rows, k), device=args.device)

        def loss_fn() -> torch.Tensor:  # as SynerGenVLForCausalLM.forward calls it
            return head.code_nll(h, codes, rows_per_chunk(chunk_logits, k * cfg.codebook_size)).sum()
    else:
        lm_head = torch.nn.Linear(args.hidden, cfg.vocab_size, bias=False).to(args.device)
        h = torch.randn(n, args.hidden, device=args.device, requires_grad=True)
        tgt = torch.randint(0, cfg.vocab_size, (n,), device=args.device)

        def loss_fn() -> torch.Tensor:
            return chunked_cross_entropy(lm_head, h, tgt, rows_per_chunk(chunk_logits, cfg.vocab_size)).sum()
    cuda = args.device.startswith("cuda")
    base = _memory_base(cuda)
    t = time.perf_counter()
    loss_fn().backward()
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    peak = _memory_peak(cuda, base)
    q.put({"step_s": dt, "peak_mb": max(peak, 0) / 2**20})


def _in_process(target, *a) -> dict:
    q = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=target, args=(*a, q))
    proc.start()
    out = q.get()
    proc.join()
    return out


def loss_bench(args) -> None:
    unchunked = 2**62
    print(f"loss forward+backward, peak memory (device {args.device}): image = unfolding head ({args.head_layers} layers, width "
          f"{args.hidden}) + classifier over codebook {args.loss_codebook}, 64x64 codes per image, fold 2x8; text = LM head "
          f"over vocab {args.loss_vocab}; chunked at loss_chunk_logits={args.chunk_logits} (model default 2**25)")
    print(f"{'loss':>5} {'n':>6} {'logits MB (fp32)':>17} {'unchunked MB':>13} {'chunked MB':>11} {'memory ratio':>13} "
          f"{'unchunked s':>12} {'chunked s':>10} {'time ratio':>11}")
    runs = [("image", n, 16 * 256 * args.loss_codebook * n) for n in args.images]
    runs += [("text", n, args.loss_vocab * n) for n in args.text_tokens]
    for kind, n, n_logits in runs:
        full = _in_process(loss_worker, kind, n, unchunked, args)
        chunked = _in_process(loss_worker, kind, n, args.chunk_logits, args)
        print(f"{kind:>5} {n:>6} {n_logits * 4 / 2**20:>17.0f} {full['peak_mb']:>13.0f} {chunked['peak_mb']:>11.0f} "
              f"{chunked['peak_mb'] / max(full['peak_mb'], 1e-9):>13.3f} {full['step_s']:>12.2f} {chunked['step_s']:>10.2f} "
              f"{chunked['step_s'] / full['step_s']:>11.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--head-layers", type=int, default=2)
    p.add_argument("--codebook", type=int, default=4096, help="32768 = Emu3's; smaller keeps a CPU run short")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--part", choices=["all", "step", "loss"], default="all")
    p.add_argument("--loss-codebook", type=int, default=32768, help="the image-loss comparison's codebook (Emu3's)")
    p.add_argument("--loss-vocab", type=int, default=151936, help="the text-loss comparison's vocabulary (Qwen2's)")
    p.add_argument("--images", type=int, nargs="+", default=[1, 2, 4], help="image counts of the image-loss comparison")
    p.add_argument("--text-tokens", type=int, nargs="+", default=[2048], help="text-target counts of the text-loss comparison")
    p.add_argument("--chunk-logits", type=int, default=2**25, help="loss_chunk_logits of the chunked runs")
    args = p.parse_args()
    if args.part in ("all", "loss"):
        loss_bench(args)
    if args.part == "loss":
        return
    ctx = mp.get_context("spawn")
    rows = []
    for fold in [(2, 8), (2, 4), (1, 1)]:
        q = ctx.Queue()
        proc = ctx.Process(target=step_worker, args=(fold, args, q))
        proc.start()
        rows.append(q.get())
        proc.join()
    base = rows[-1]
    print(f"training step, one 512x512 generation sample (64x64 codes), device {args.device}, LLM {args.layers}x{args.hidden}, "
          f"head {args.head_layers} layers, codebook {args.codebook}, stage 1, median of {args.steps}")
    print(f"{'fold':>5} {'LLM positions':>14} {'step s':>8} {'peak MB':>9} {'time vs 1x1':>12} {'memory vs 1x1':>14}")
    for r in rows:
        print(f"{r['fold']:>5} {r['positions']:>14} {r['step_s']:>8.3f} {r['peak_mb']:>9.1f} {r['step_s'] / base['step_s']:>12.2f} "
              f"{r['peak_mb'] / max(base['peak_mb'], 1e-9):>14.2f}")
    routed, blended = ffn_bench(args)
    print(f"FFN fwd+bwd, 4096 positions (half image), width {args.hidden}: routed {routed * 1e3:.1f} ms, "
          f"Mono-InternVL blend {blended * 1e3:.1f} ms, routed/blend {routed / blended:.2f}")


if __name__ == "__main__":
    main()
