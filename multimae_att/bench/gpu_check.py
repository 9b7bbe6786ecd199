"""``scripts/gpu_check.sh``: the GPU figures of docs/BENCHMARKS.md in one short run.

On a CUDA machine (budget: under 8 minutes on one modern GPU; not yet timed on one):

1. the ``base`` bench preset (ViT-B/16, 224 px, batch 64) in bf16, with the original MultiMAE's
   step too when ``--vs-upstream PATH`` (or ``$MULTIMAE_SRC``) points at its checkout;
2. host syncs per training step, counted by ``torch.cuda.set_sync_debug_mode`` (expected: 0);
3. three 200-step pretraining runs of ViT-B at 224 px on synthetic scenes
   (``data_prep/make_synthetic.py``): a fresh scoring pass every step (``high``, no cache),
   the attention cache (``high``), and AMT on the cache;
4. with two or more GPUs: the 2-process run against the 1-process run on the same global batch
   (losses and final weights must agree, as ``tests/pretrain/test_pretrain_ddp.py`` checks on a CPU).

It prints s/step and samples/s of each run, the bench's efficiency, peak memory and ratios, and
writes everything under ``--out`` (``summary.json``). ``--dry-run`` runs the same code on the CPU
at toy sizes (the test suite does), so the script is known to work before a GPU is lent.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[2]

#: The three pretraining runs: config overrides on top of :func:`pretrain_overrides`.
RUNS = {
    "fresh": ["masking.strategy=high", "masking.cache.enabled=false"],
    "cache": ["masking.strategy=high", "masking.cache.enabled=true"],
    "amt": ["masking.strategy=amt", "masking.params.throw_ratio=0.4", "masking.cache.enabled=true"],
}


def pretrain_overrides(args: argparse.Namespace, data: Path) -> list[str]:
    """ViT-B at 224 px, bf16, ``--steps`` steps of ``--batch`` (toy sizes with ``--dry-run``)."""
    if args.dry_run:
        size = ["model.size=tiny", "model.semseg_num_classes=10", "data.image_size=32",
                "masking.num_encoded_tokens=6", "train.cpu=true", 'train.mixed_precision="no"',
                "masking.cache.grid=8"]
    else:
        size = ["model.size=base", "model.semseg_num_classes=133", "data.image_size=224",
                "masking.num_encoded_tokens=98", "train.mixed_precision=bf16"]
    every = max(1, args.steps // 10)
    return size + [
        f"data.root={data}", f"data.batch_size={args.batch}", f"data.num_workers={args.workers}",
        f"train.max_steps={args.steps}", "train.epochs=1000", f"train.save_every={10 * args.steps}",
        "train.final_export=false", "optim.lr=1e-4", "schedule.warmup_epochs=1", "schedule.total_epochs=1000",
        "schedule.start_epoch=0", f"log.every={every}", "log.pictures_every=0", "log.progress=false",
        "log.tensorboard=false"]


def _run(cmd: list[str], log: Path, env: dict | None = None) -> float:
    """Run ``cmd`` with output to ``log``; return its wall seconds; raise with the log's tail on failure."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(True)[-30:])
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); end of {log}:\n{tail}")
    return time.perf_counter() - t0


def run_summary(run_dir: Path, steps: int, batch: int, wall: float) -> dict:
    """s/step and samples/s of a run from its metrics.jsonl (the first logged interval, which
    holds start-up, is left out where there are more)."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not recs or recs[-1]["step"] != steps:
        raise RuntimeError(f"{run_dir}: expected {steps} logged steps, metrics.jsonl ends at "
                           f"{recs[-1]['step'] if recs else 'nothing'}")
    timed = recs[1:] if len(recs) > 1 else recs
    per_step = [r["step_time"] for r in timed if "step_time" in r]  # mean s/step since the previous line
    s_step = statistics.median(per_step) if per_step else float("nan")
    peak = max((r["peak_memory_mib"] for r in recs if "peak_memory_mib" in r), default=None)
    return {"steps": steps, "wall_s": round(wall, 1), "s_per_step": s_step, "samples_per_s": batch / s_step,
            "peak_memory_mib": peak, "final_loss": recs[-1]["loss"]}


def sync_counts(device, preset: str) -> dict[str, int] | None:
    """Host syncs per training step of each bench case, counted by CUDA's sync debug mode."""
    import tempfile
    import warnings

    import torch

    from multimae_att.bench.cases import BenchCases
    from multimae_att.bench.presets import PRESETS

    if device.type != "cuda":
        return None  # CPU: tests/pretrain/test_step_syncs.py checks the same on the dispatcher
    out = {}
    with tempfile.TemporaryDirectory() as d:
        bench = BenchCases(PRESETS[preset], device, "bf16", d)
        for name in ("random_step", "attention_step", "cached_step", "amt_step", "hpm_step", "cached_hpm_step"):
            step = bench.cases()[name]
            step()
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    step()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            out[name] = sum("synchroniz" in str(w.message) for w in caught)
    return out


def ddp_check(args: argparse.Namespace, data: Path, out: Path) -> dict:
    """2 processes x half the batch vs 1 process x the whole batch, same steps: max weight difference."""
    import torch

    base = pretrain_overrides(args, data) + RUNS["cache"] + ["optim.eps=1e-4", "optim.clip_grad=1.0",
                                                             f"train.max_steps={min(args.steps, 20)}"]
    launch = [sys.executable, "-m", "multimae_att.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    half = [o for o in base if not o.startswith("data.batch_size=")] + [
        f"data.batch_size={args.batch // 2}", 'train.mixed_precision="no"', "train.final_export=true"]
    whole = [o for o in half if not o.startswith("data.batch_size=")] + [f"data.batch_size={args.batch}"]
    for d in ("ddp_two", "ddp_one"):
        shutil.rmtree(out / d, ignore_errors=True)
    _run([*launch, "run_pretrain.py", f"output_dir={out / 'ddp_two'}", *half], out / "ddp_two.log")
    _run([sys.executable, "run_pretrain.py", f"output_dir={out / 'ddp_one'}", *whole], out / "ddp_one.log")
    w1 = torch.load(out / "ddp_one" / "final.pth", weights_only=True)["model"]
    w2 = torch.load(out / "ddp_two" / "final.pth", weights_only=True)["model"]
    worst = max((w1[k].float() - w2[k].float()).abs().max().item() for k in w1)
    return {"max_weight_difference": worst, "ok": worst < 1e-4}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_check")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--scenes", type=int, default=256, help="synthetic training scenes (256 px)")
    parser.add_argument("--vs-upstream", default=os.environ.get("MULTIMAE_SRC") or None, metavar="PATH")
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: checks the script itself")
    args = parser.parse_args(argv)

    import torch

    if args.dry_run:
        args.steps, args.batch, args.workers, args.scenes = min(args.steps, 4), min(args.batch, 4), 0, 8
        device, preset, dtype = torch.device("cpu"), "micro", "fp32"
        torch.set_num_threads(1)  # toy sizes; two threads on a busy CPU only spin
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: this check is for a GPU machine (use --dry-run to test the script)")
    else:
        device, preset, dtype = torch.device("cuda"), "base", "bf16"
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
                     "torch": torch.__version__, "gpus": torch.cuda.device_count(), "started_utc":
                     time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    t_start = time.perf_counter()

    from multimae_att.bench import format_table, run_bench

    bench_kw = dict(warmup=0, repeats=1) if args.dry_run else {}
    bench = run_bench(preset, dtype=dtype, device=device, vs_upstream=args.vs_upstream, **bench_kw)
    (args.out / "bench.json").write_text(json.dumps(bench, indent=1))
    print(format_table(bench), flush=True)
    summary["bench"] = {k: bench[k] for k in ("ratios", "ab_ratios", "efficiency", "peak_memory_mib",
                                              "matmul_peak_flops")}
    summary["bench"]["median_s"] = {c: bench["runs"][bench["dtype"]]["median_s"][c]
                                    for c in bench["runs"][bench["dtype"]]["median_s"]}
    summary["bench"]["vs_upstream"] = bench.get("vs_upstream")
    summary["host_syncs_per_step"] = sync_counts(device, "tiny" if not args.dry_run else "micro")

    data = args.out / "data"
    if not (data / ".complete").exists():
        _run([sys.executable, "data_prep/make_synthetic.py", "--out", str(data), "--num-train", str(args.scenes),
              "--num-val", "4", "--size", "48" if args.dry_run else "256", "--format", "folder"],
             args.out / "data.log")
    summary["runs"] = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if args.dry_run else None
    for name, extra in RUNS.items():
        run_dir = args.out / name
        shutil.rmtree(run_dir, ignore_errors=True)  # our own output: always a fresh run
        cmd = [sys.executable, "run_pretrain.py", f"output_dir={run_dir}", *pretrain_overrides(args, data), *extra]
        wall = _run(cmd, args.out / f"{name}.log", env)
        summary["runs"][name] = run_summary(run_dir, args.steps, args.batch, wall)
        print(f"{name:>6}: {summary['runs'][name]}", flush=True)
    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        summary["ddp"] = ddp_check(args, data, args.out)
    else:
        summary["ddp"] = "skipped (fewer than 2 GPUs)"
    summary["total_s"] = round(time.perf_counter() - t_start, 1)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "bench"}, indent=1))
    print(f"gpu_check done in {summary['total_s']} s: {args.out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
