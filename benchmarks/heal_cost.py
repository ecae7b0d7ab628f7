"""What healing costs: the default run healed against unhealed, and healing's memory against its tokens.

    python benchmarks/heal_cost.py --json > benchmarks/results/heal_cost.json
    python benchmarks/heal_cost.py --dtype float32 --also /tmp/main-91d525f   # another checkout beside it

1. `python -m search run --budget 12%` with `--heal none` and `--heal linear`, each a fresh process
   on a fresh store, one after the other on this machine (`--also DIR`: the same unhealed command
   from another checkout, e.g. an older main, in the same run): wall time, peak RSS (the process's
   own, from wait4; the scratch files healing writes are page cache, not RSS), the front it printed.
2. Healing's memory at `--heal-tokens` 8192, 32768 and 65536 (4096 held-out tokens so that 65536
   fit in the default corpus): in a fresh process per size, peak RSS once the fitting statistics
   are summed and a three-run set is fitted sequentially, less the RSS before (model, prefix caches).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEMORY_SETS = (14, 15, 17, 19)  # three healable runs: two sequential passes


def timed(command: list[str], cwd: Path) -> dict:
    """Wall seconds, peak RSS (GB) and output of one child process."""
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert child.stdout is not None
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"{' '.join(command)} failed with exit code {child.returncode}")
    return {"wall_s": time.perf_counter() - started, "peak_rss_gb": usage.ru_maxrss / 1e6, "front": out.strip()}


def default_runs(dtype: str, also: list[Path], say) -> dict:
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, heal, checkout in [
            *((f"unhealed ({path})", "none", path) for path in also),
            ("unhealed", "none", ROOT),
            ("healed", "linear", ROOT),
        ]:
            store = f"sqlite:///{scratch}/{len(rows)}.db"
            command = [sys.executable, "-m", "search", "run", "--budget", "12%", "--dtype", dtype, "--storage", store]
            if checkout == ROOT:
                command += ["--heal", heal]
            say(f"{name}: {' '.join(command[1:])}")
            rows[name] = timed(command, checkout)
            say(f"  {rows[name]['wall_s']:.0f} s, {rows[name]['peak_rss_gb']:.2f} GB")
    healed, unhealed = rows["healed"], rows["unhealed"]
    return {
        "runs": rows,
        "healed_over_unhealed_wall": healed["wall_s"] / unhealed["wall_s"],
        "healed_over_unhealed_rss": healed["peak_rss_gb"] / unhealed["peak_rss_gb"],
        **{
            f"healed_over_{name}_wall": healed["wall_s"] / row["wall_s"]
            for name, row in rows.items()
            if name.startswith("unhealed (")
        },
    }


MEMORY_PROBE = """
import json, resource, sys
sys.path.insert(0, {root!r})
import torch
from evaluators.data import make_splits
from evaluators.latency import layer_kinds
from search.evaluator import Evaluator
from search.model.loading import load_model
from search.model.removal import Removal
loaded = load_model(None, {dtype!r}, "cpu", False)
splits = make_splits(loaded.tokenizer, None, 4096, 4096, 512, {tokens})
evaluator = Evaluator(loaded.model, splits, torch.zeros(1, 8, dtype=torch.long),
                      layer_kinds=layer_kinds(loaded.model), heal="linear")
evaluator.baseline()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
before = rss()
evaluator.healing(Removal.of({removed!r}))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"before_gb": before / 1e9, "peak_gb": peak / 1e9, "extra_gb": (peak - before) / 1e9,
                  "scratch_gb": evaluator._fit.states.bytes() / 1e9, "fitted_tokens": evaluator._fit.tokens}}))
"""


def memory_rows(dtype: str, say) -> list[dict]:
    rows = []
    for tokens in (8192, 32768, 65536):
        code = MEMORY_PROBE.format(root=str(ROOT), dtype=dtype, tokens=tokens, removed=MEMORY_SETS)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        row = {"heal_tokens": tokens, **json.loads(out.strip().splitlines()[-1])}
        say(
            f"--heal-tokens {tokens}: extra {row['extra_gb']:.3f} GB over {row['before_gb']:.2f} GB, "
            f"scratch on disk {row['scratch_gb']:.2f} GB"
        )
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="auto", help="numerics of every run (default: auto, as the default run)")
    parser.add_argument("--also", type=Path, nargs="*", default=[], help="other checkouts: time their unhealed run")
    parser.add_argument("--skip-runs", action="store_true", help="only the memory part")
    parser.add_argument("--skip-memory", action="store_true", help="only the default runs")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if args.json else print
    report: dict = {"dtype": args.dtype, "machine": os.uname().machine}
    if not args.skip_runs:
        report["default_run"] = default_runs(args.dtype, args.also, say)
    if not args.skip_memory:
        report["memory"] = memory_rows(args.dtype, say)
        extra = [row["extra_gb"] for row in report["memory"]]
        report["memory_spread"] = (max(extra) - min(extra)) / max(extra)
        say(f"healing's extra memory: spread {report['memory_spread']:.1%} across --heal-tokens 8192/32768/65536")
    if args.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
