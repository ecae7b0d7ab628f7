"""Scale: what one evaluation costs on models of real sizes, and what the default command would take.

    python benchmarks/scale.py --json > benchmarks/results/scale_cpu.json      # every shape, on the CPU
    python benchmarks/scale.py --device cuda --json > benchmarks/results/scale_cuda.json
    python benchmarks/scale.py --render benchmarks/results/scale_cpu.json      # the docs/benchmarks.md table

Randomly initialised models built from the configs of real ones (the shapes are written out below:
nothing is downloaded): SmolLM2-135M, Qwen2.5-0.5B, Llama-3.2-1B and Llama-3.1-8B. Where the whole
model does not fit the device (`--max-gb`), a shape keeps fewer decoder layers at full width, which
keeps each layer's cost and the LM head's exactly; the row says how many it kept. Cost does not
depend on the weights' values, so random weights time what the real model would.

Per shape, each in a process of its own (so peak memory is the shape's own), in --dtype:
- `full_s`: one perplexity pass of the unpruned model over --tokens calibration tokens (what
  building the prefix cache costs; a held-out measurement costs the same per token);
- `eval_s`: (median of 3) one candidate's calibration evaluation from the prefix cache, the middle layer removed
  (what a trial costs: it runs the layers after its first removed one, and the LM head);
- `healed_s`: (median of 3) the same candidate healed (`--heal linear`): the fit of its run's map from sums
  collected once, plus the healed pass; `collect_s`: that one-off collection over --heal-tokens;
- `peak_gb`: peak resident memory (RSS) of the process, or CUDA's max allocated on a GPU;
- `projected_default_s`: the default command (`run --budget 12%`, 4096 calibration, 8192 held-out
  and 2048 sensitivity tokens, 24 trials, staged greedy) on the whole model, from the measured
  cost per decoder-layer token and per LM-head token and a count of the passes that command makes
  (`default_run_work`); a projection, not a run.
`us_per_gflop`: eval_s over the arithmetic it did (2 x parameters run per token x tokens, plus
attention): constant across shapes when the time grows with parameters x tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluators.healing import collect_fit_stats, fit_healing, healed, run_pairs  # noqa: E402
from evaluators.perplexity import from_batches  # noqa: E402
from evaluators.prefix import build_prefix_cache  # noqa: E402
from search.config import RunConfig  # noqa: E402
from search.model.numerics import DTYPES, apply_numerics  # noqa: E402
from search.model.removal import Removal  # noqa: E402
from search.model.surgery import layer_param_counts  # noqa: E402

# The published configs' shapes (config.json of each hub repository), the fields cost depends on.
SHAPES = {
    "SmolLM2-135M": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
    ),
    "Qwen2.5-0.5B": dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
    ),
    "Llama-3.2-1B": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
        head_dim=64,
    ),
    "Llama-3.1-8B": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
    ),
}  # fmt: skip


REPEATS = 3  # evaluations timed per shape (the median is reported)


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int  # decoder layers in the real model
    kept: int  # decoder layers built here (fewer where the whole model does not fit)
    params: int  # the real model's parameters
    layer_params: int
    head_params: int  # the LM head's (computed per token even when tied to the embedding)


def build(name: str, layers: int | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Built where it runs, in its dtype: an 8B model initialised on the host in float32 takes 32 GB and
    minutes before it reaches a GPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(SHAPES[name])
    if layers is not None:
        fields["num_hidden_layers"] = layers
    config = AutoConfig.for_model(fields.pop("model_type"), **fields, max_position_embeddings=4096)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def shape_of(name: str) -> Shape:
    """The real model's counts, from a two-layer build (layers are identical)."""
    small = build(name, 2)
    layer = layer_param_counts(small)[0]
    total_small = sum(p.numel() for p in small.parameters())
    layers = SHAPES[name]["num_hidden_layers"]
    head = small.get_output_embeddings().weight.numel()
    return Shape(name, layers, layers, total_small + (layers - 2) * layer, layer, head)


def layers_that_fit(shape: Shape, max_gb: float, bytes_per: int) -> int:
    fixed = (shape.params - shape.layers * shape.layer_params) * bytes_per
    room = max_gb * 2**30 * 0.6 - fixed  # weights take at most 60 % of the limit: activations, caches, fits
    return max(2, min(shape.layers, int(room // (shape.layer_params * bytes_per))))


def default_run_work(shape: Shape, config: RunConfig) -> tuple[float, float]:
    """(decoder-layer tokens, LM-head tokens) the default command computes on the whole model.

    Counted from what a run does: the unpruned model's calibration, held-out and sensitivity passes;
    per greedy stage (one per layer the budget allows), a prefix cache of the model pruned so far and
    every remaining layer scored from it (each running the layers after it); per trial, a calibration
    evaluation from the cache (on average half the layers), and for the front's points (about one per
    greedy stage) a held-out one likewise. Latency rounds are left out (128 tokens each)."""
    L = shape.layers
    stages = int(config.budget * shape.params // shape.layer_params)
    layer_tokens = (config.calib_tokens + config.test_tokens) * L
    head_tokens = config.calib_tokens + config.test_tokens
    for j in range(stages):
        kept = L - j
        layer_tokens += config.sensitivity_tokens * (kept + kept * (kept - 1) / 2)
        head_tokens += config.sensitivity_tokens * (1 + kept)
    evaluations = config.trials * config.calib_tokens + stages * config.test_tokens
    layer_tokens += evaluations * L / 2
    head_tokens += evaluations
    return layer_tokens, head_tokens


def measure(name: str, device: str, dtype: str, tokens: int, heal_tokens: int, seq: int, max_gb: float) -> dict:
    """One shape, in this process."""
    shape = shape_of(name)
    weights = DTYPES[dtype]
    kept = layers_that_fit(shape, max_gb, torch.tensor([], dtype=weights).element_size())
    started = time.perf_counter()
    model = build(name, kept, device, weights).eval()
    apply_numerics(model, dtype)
    build_s = time.perf_counter() - started
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    windows = torch.randint(0, vocab, (max(1, tokens // seq), seq), generator=generator)
    fit_windows = torch.randint(0, vocab, (max(1, heal_tokens // seq), seq), generator=generator)
    batch = RunConfig().batch_size
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    def timed(fn):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        value = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return value, time.perf_counter() - start

    # Warm-up at the measured shapes (probe, allocator, the kernels' first launches): a GPU's first pass
    # over a batch shape costs several times the next one.
    build_prefix_cache(model, windows[:batch], None, batch).perplexity(Removal.of([0]))
    cache, full_s = timed(lambda: build_prefix_cache(model, windows, None, batch))
    middle = Removal.of([kept // 2])
    eval_s = statistics.median(timed(lambda: cache.perplexity(middle))[1] for _ in range(REPEATS))
    stats, collect_s = timed(lambda: collect_fit_stats(model, fit_windows, None, batch, run_pairs(middle)))

    def healed_eval():
        healing = fit_healing(model, stats, middle)
        with healed(model, healing):
            return from_batches(cache.nll_batches(middle, healing.first_changed))

    healed_s = statistics.median(timed(healed_eval)[1] for _ in range(REPEATS))
    stats.close()
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux
    # Per token: each decoder layer the evaluation ran, and the LM head (attention over the window).
    run_layers = kept - 1 - kept // 2
    attention = 4 * model.config.hidden_size * (seq + 1) / 2
    flops = tokens * (run_layers * (2 * shape.layer_params + attention) + 2 * shape.head_params)
    # Cost per layer-token and head-token from the two passes: full = L·a + h, eval = run_layers·a + h.
    per_layer = (full_s - eval_s) / (tokens * (kept - run_layers))
    per_head = max(0.0, eval_s / tokens - run_layers * per_layer)
    layer_tokens, head_tokens = default_run_work(shape, RunConfig())
    return {
        "shape": name,
        "layers": shape.layers,
        "layers_built": kept,
        "params": shape.params,
        "params_built": sum(p.numel() for p in model.parameters()),
        "device": device,
        "dtype": dtype,
        "tokens": tokens,
        "heal_tokens": heal_tokens,
        "build_s": build_s,
        "full_s": full_s,
        "eval_s": eval_s,
        "collect_s": collect_s,
        "healed_s": healed_s,
        "healed_over_eval": healed_s / eval_s,
        "eval_gflop": flops / 1e9,
        "us_per_gflop": eval_s / (flops / 1e9) * 1e6,
        "peak_gb": peak,
        "projected_default_s": layer_tokens * per_layer + head_tokens * per_head,
    }


RUN_AND_REPORT = """
import resource, runpy, sys
sys.argv = ["search", *sys.argv[1:]]
try:
    runpy.run_module("search", run_name="__main__")
finally:
    print("peak_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def end_to_end(model: str | None, heal: str, device: str) -> dict:
    """The default command on a real model, in a process of its own: wall seconds and peak RSS."""
    with tempfile.TemporaryDirectory() as store:
        command = [sys.executable, "-c", RUN_AND_REPORT, "run", "--budget", "12%", "--heal", heal]
        command += ["--device", device, "--storage", f"sqlite:///{store}/study.db"]
        command += ["--model", model] if model else []
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        wall = time.perf_counter() - started
    if done.returncode != 0:  # the command's own one-line error (the peak_kb line comes after it)
        said = [line for line in done.stderr.splitlines() if line.startswith("error:")] or [done.stderr.strip()[-300:]]
        return {"model": model or "SmolLM2-135M-Instruct (embedded)", "heal": heal, "error": said[-1]}
    peak = next(int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("peak_kb"))
    dtype = next(
        (line.split("--dtype auto: ")[1].split()[0] for line in done.stderr.splitlines() if "--dtype auto: " in line),
        None,
    )
    return {
        "model": model or "SmolLM2-135M-Instruct (embedded)",
        "heal": heal,
        "dtype": dtype,
        "wall_s": wall,
        "peak_gb": peak / 2**20,
        "front": done.stdout.strip().splitlines()[-6:],
    }


def machine(device: str) -> str:
    from search.evaluations import device_label  # the CPU's model name, as the evaluation cache keys it

    host = f"{os.cpu_count()}-core {device_label(torch.device('cpu')).split(':', 1)[1]}"
    return f"{torch.cuda.get_device_name(device)} on a {host}" if device.startswith("cuda") else host


def render(results: dict) -> str:
    lines = [
        f"{results['machine']}, {results['device']}, {results['dtype']}, {results['date']}; "
        f"{results['tokens']} calibration tokens per evaluation, {results['heal_tokens']} fitting tokens",
        "",
        "| shape | params | layers built | full pass (s) | evaluation (s) | healed (s) | collect (s) "
        "| us/GFLOP | peak (GB) | projected default run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        built = f"{r['layers_built']} of {r['layers']}"
        projected = r["projected_default_s"]
        when = f"{projected / 3600:.1f} h" if projected >= 3600 else f"{projected / 60:.0f} min"
        when = f"{projected:.0f} s" if projected < 120 else when
        lines.append(
            f"| {r['shape']} | {r['params'] / 1e9:.2f}B | {built} | {r['full_s']:.2f} | {r['eval_s']:.2f} "
            f"| {r['healed_s']:.2f} | {r['collect_s']:.2f} | {r['us_per_gflop']:.0f} | {r['peak_gb']:.1f} | {when} |"
        )
    spread = results.get("us_per_gflop_spread")
    if spread is not None:
        lines += ["", f"us/GFLOP across shapes: max/min = {spread:.2f}"]
    if results.get("real"):
        lines += [
            "",
            "| model (default command, `--budget 12%`) | --heal | dtype | wall | peak memory (GB) |",
            "|---|---|---|---|---|",
        ]
        for r in results["real"]:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['heal']} | | refused: {r['error'].splitlines()[-1]} | |")
            else:
                lines.append(
                    f"| {r['model']} | {r['heal']} | {r['dtype']} | {r['wall_s'] / 60:.1f} min | {r['peak_gb']:.2f} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=DTYPES.names)
    parser.add_argument("--tokens", type=int, default=1024, help="calibration tokens per evaluation (default 1024)")
    parser.add_argument("--heal-tokens", type=int, default=2048, help="fitting tokens (default 2048)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-gb", type=float, default=None, help="memory for one shape (default: 60%% of RAM)")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--render", metavar="FILE", help="print the table from a --json result")
    parser.add_argument(
        "--real",
        nargs="*",
        metavar="MODEL",
        help="also the default command end to end on real models (no MODEL: the embedded SmolLM2-135M), "
        "unhealed and --heal linear; a .gguf path takes Gemma-3-270M (docs/benchmarks.md)",
    )
    parser.add_argument("--skip-shapes", action="store_true", help="only the --real runs")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one shape in this process
    args = parser.parse_args()
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return
    if args.max_gb is None:
        if args.device.startswith("cuda"):
            args.max_gb = torch.cuda.get_device_properties(torch.device(args.device)).total_memory / 2**30
        else:
            args.max_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 * 0.6
    if args.one:
        row = measure(args.one, args.device, args.dtype, args.tokens, args.heal_tokens, args.seq_len, args.max_gb)
        print(json.dumps(row))
        return
    rows = []
    started = time.perf_counter()
    for name in [] if args.skip_shapes else args.shapes:
        command = [sys.executable, __file__, "--one", name, "--device", args.device, "--dtype", args.dtype]
        command += ["--tokens", str(args.tokens), "--heal-tokens", str(args.heal_tokens)]
        command += ["--seq-len", str(args.seq_len), "--max-gb", str(args.max_gb)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{name}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{name}: {rows[-1]['eval_s']:.2f} s per evaluation  {json.dumps(rows[-1])}", file=sys.stderr)
    real = []
    for model in [None] if args.real == [] else args.real or []:
        for heal in ("none", "linear"):
            real.append(end_to_end(model, heal, args.device))
            if not args.json:
                print(f"{real[-1]['model']} --heal {heal}: {real[-1].get('wall_s', 0):.0f} s", file=sys.stderr)
    speeds = [r["us_per_gflop"] for r in rows]
    results = {
        "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]),
        "machine": machine(args.device),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "device": args.device,
        "dtype": args.dtype,
        "tokens": args.tokens,
        "heal_tokens": args.heal_tokens,
        "seq_len": args.seq_len,
        "rows": rows,
        "real": real,
        "us_per_gflop_spread": max(speeds) / min(speeds) if speeds else None,
        "wall_s": time.perf_counter() - started,
    }
    print(json.dumps(results, indent=2) if args.json else render(results))


if __name__ == "__main__":
    main()
