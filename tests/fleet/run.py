#!/usr/bin/env python3
"""The fleet simulation at full size: figures and plots (issue 12, Fleet).

10,000 agents x 20 secrets against one vault of 4,000 transactions per 10 s
(see fleetsim.py for the model and what is the agent's real code). Three
scenarios, each with per-secret and list-based refresh: a steady day,
2,000 VMs booting in the same minute beside 8,000 running, and a 10-minute
vault outage. Prints one table of figures and the issue's targets, met or
not, and writes one PNG per scenario (transactions per 10 s over time).

Run: ``.venv/bin/python tests/fleet/run.py [--agents 10000] [--plots DIR] [--fixed-window]
[--jobs 2]``
(needs matplotlib, in the test extras, for the plots).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fleetsim  # noqa: E402
from fleetsim import LIMIT, Result, Verdict  # noqa: E402


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--booting", type=int, default=2_000)
    parser.add_argument("--hours", type=float, default=24.0, help="the steady day's length")
    parser.add_argument("--fixed-window", action="store_true",
                        help="aligned 10-s windows instead of a sliding one")
    parser.add_argument("--plots", default="fleet-plots", help="directory for the PNGs")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="runs simulated side by side (processes)")
    parser.add_argument("--only", choices=("steady", "scale-out", "outage"),
                        help="run one scenario (figures only; no targets table)")
    args = parser.parse_args(argv)
    sliding = not args.fixed_window
    common: Dict[str, Any] = dict(seed=args.seed, sliding=sliding)
    started = time.monotonic()
    scenarios = [
        ("steady", functools.partial(fleetsim.steady, args.agents, hours=args.hours, **common)),
        ("scale-out", functools.partial(fleetsim.scale_out, args.agents, args.booting,
                                        **common)),
        ("outage", functools.partial(fleetsim.outage, args.agents, **common)),
    ]
    runs = [functools.partial(run, list_mode=mode) for name, run in scenarios
            if args.only in (None, name) for mode in (False, True)]
    # Each run is seeded on its own: running them side by side changes no figure.
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(_timed, runs))
    pairs = []
    names = [name for name, _ in scenarios if args.only in (None, name)]
    for index, name in enumerate(names):
        (per_secret, seconds), (listed, more) = results[2 * index], results[2 * index + 1]
        print(f"# {name}: simulated in {seconds:.1f} + {more:.1f} s", file=sys.stderr)
        pairs.append((name, (per_secret, listed)))
    print(f"{args.agents} agents x 20 secrets, one vault of {LIMIT} per 10 s "
          f"({'sliding' if sliding else 'fixed'} window); simulated in "
          f"{time.monotonic() - started:.0f} s\n")
    print("| scenario | refresh | peak served /10 s | peak offered /10 s | 429s | requests "
          "| last agent ready/current | requests per agent-hour |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, pair in pairs:
        for result in pair:
            print(_row(name, result))
    if args.only is None:
        print("\n| target | measured | met |\n|---|---|---|")
        for verdict in _verdicts(*(pair for _, pair in pairs)):
            print(f"| {verdict.target} | {verdict.measured} "
                  f"| {'yes' if verdict.is_met else 'NO'} |")
    if not args.no_plots:
        os.makedirs(args.plots, exist_ok=True)
        for name, pair in pairs:
            path = os.path.join(args.plots, f"fleet-{name}.png")
            plot(name, pair, path)
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _timed(run: Callable[[], Result]) -> Tuple[Result, float]:
    """One run and its wall time, in a worker process."""
    started = time.monotonic()
    return run(), time.monotonic() - started


def _verdicts(steady: "tuple[Result, Result]", scale: "tuple[Result, Result]",
              down: "tuple[Result, Result]") -> List[Verdict]:
    verdicts = fleetsim.judge_steady(*steady)
    for result in scale:
        verdicts += fleetsim.judge_scale_out(result)
    for result in down:
        verdicts += fleetsim.judge_outage(result)
    return verdicts


def _row(name: str, result: Result) -> str:
    mode = "list" if result.list_mode else "per-secret"
    recovery = "never" if result.recovery_s is None else f"{result.recovery_s:.0f} s"
    if result.ideal_s is not None:
        recovery += f" (ideal {result.ideal_s:.0f} s)"
    return (f"| {name} | {mode} | {result.peak(result.served)} | {result.peak(result.offered)} "
            f"| {sum(result.throttled)} | {result.total} | {recovery} "
            f"| {result.per_agent_hour:.1f} |")


def plot(name: str, pair: "tuple[Result, Result]", path: str) -> None:
    """Transactions per 10 s over time, per-secret above list-based: served,
    throttled (429) and failed (503), with the limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 1, figsize=(8, 5), sharex=True, dpi=80)
    for axis, result in zip(axes, pair):
        hours = result.horizon_s > 4 * 3600
        scale, unit = (3600.0, "h") if hours else (60.0, "min")
        xs = [i * 10 / scale for i in range(len(result.windows(result.served, 0)))]
        for series, label, color in ((result.served, "served", "C0"),
                                     (result.throttled, "429", "C1"),
                                     (result.failed, "503 (outage)", "C2")):
            counts = result.windows(series, 0)
            if any(counts):
                axis.plot(xs, counts, label=label, linewidth=0.8, color=color)
        axis.axhline(LIMIT, color="black", linestyle="--", linewidth=0.8, label="limit")
        axis.set_title(f"{name}: {'list-based' if result.list_mode else 'per-secret'} refresh",
                       fontsize=9)
        axis.set_ylabel("requests / 10 s", fontsize=8)
        axis.set_yscale("symlog", linthresh=10)
        axis.set_ylim(bottom=0)
        axis.legend(fontsize=7, loc="upper right")
        axis.tick_params(labelsize=7)
    axes[-1].set_xlabel(f"time ({unit})", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
