# Benchmark: membership that scales (issue 18). Prints one JSON line.
# Lives here: the simulated half, the sans-IO SWIM core (p2p/swim.py) driven by its simulation
# (p2p/swim_sim.py) on a virtual clock, and the place where the real-process half plugs in
# (measure_real_nodes: benchmarks/membership_nodes.py; --no-nodes leaves it out).
# Must not live here: protocol or simulation logic (p2p/swim.py, p2p/swim_sim.py).
#
# One run per size N and seed (swim_sim.measure_network): a converged network of N nodes,
# 20 periods with nothing happening, then 10 new nodes join at one moment (each through 3
# random members), then 5 random original members crash, 2 periods apart. A period is the
# protocol period (1 s by default), so periods read as seconds. Messages take 2-30 ms, none is
# lost (the false-positive figure below is the one with loss).
#
#   sim_converge_periods_N     from the joins until every live node sees every other live node
#                              alive (checked every quarter period); the mean over the seeds
#   sim_detect_periods_N       from a crash until every live node that knew the crashed node
#                              holds it dead; the mean over the crashes of every seed
#                              (..._max_N: the slowest crash)
#   sim_bytes_per_node_per_period_N   what a node sends while nothing changes (the 20 quiet
#                              periods): probes, acks and push-pull roots, msgpack-encoded
#                              protocol messages only (no libp2p framing or encryption). This is
#                              the cost that must not grow with N.
#   sim_churn_bytes_per_node_per_period_N   the same from the joins to the last crash's
#                              detection, over the original and new nodes: the 10 new nodes'
#                              full-view downloads, gossip of 10 joins and 5 deaths, suspicions
#   sim_false_positives_N      live nodes any node declared dead in those runs (target 0)
#   sim_false_positive_rate_1000   a converged network of 1,000 nodes, 5% of messages lost,
#                              nothing else happening for --fp-periods periods: distinct
#                              (member, incarnation) declared dead by any node while its process
#                              ran, per hour of simulated time (target 0). With --quick: _100.
#   sim_detect_ratio_10000_100, sim_converge_ratio_10000_100   the largest size's figure over
#                              the smallest's (the target: within 2x); the reference is
#                              the same simulation at 100 nodes, measured in the same run
#   sim_wall_s_N               seconds this process spent simulating size N (all seeds)
#   converge_s_30, detect_dead_s_30, idle_cpu_pct_per_node_30, idle_bytes_per_s_per_node_30
#                              real node processes: null for now (nodes_note says why)
# --quick runs sizes 20,50,100 with one seed each and a short false-positive run (smoke test).
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import finish, ratio, run_steps  # noqa: E402

from p2p.swim import SwimConfig  # noqa: E402
from p2p.swim_sim import measure_false_positives, measure_network  # noqa: E402

SIZES = (100, 1000, 10000)
QUICK_SIZES = (20, 50, 100)
JOINERS = 10
CRASHES = 5
FP_LOSS = 0.05
REAL_NODES = 30


def seeds_for(n: int, quick: bool) -> int:
    """More runs where they are cheap: a join or a crash is one sample per run."""
    return 1 if quick or n >= 5000 else 3 if n >= 1000 else 5


def measure_simulation(n: int, seeds: int, out: dict[str, Any]) -> None:
    started = time.perf_counter()
    runs = [measure_network(n, joiners=JOINERS, crashes=CRASHES, seed=seed)
            for seed in range(1, seeds + 1)]
    converge = [r.converge_periods for r in runs]
    detect = [d for r in runs for d in r.detect_periods]
    if None in converge or None in detect:
        raise RuntimeError(f"{n} nodes: no convergence or a crash undetected within the "
                           f"timeout ({converge}, {detect})")
    converged = [c for c in converge if c is not None]
    detected = [d for d in detect if d is not None]
    out[f"sim_converge_periods_{n}"] = round(statistics.mean(converged), 3)
    out[f"sim_detect_periods_{n}"] = round(statistics.mean(detected), 3)
    out[f"sim_detect_periods_max_{n}"] = round(max(detected), 3)
    out[f"sim_bytes_per_node_per_period_{n}"] = round(
        statistics.mean(r.idle_bytes_per_node_per_period for r in runs), 1)
    out[f"sim_churn_bytes_per_node_per_period_{n}"] = round(
        statistics.mean(r.churn_bytes_per_node_per_period for r in runs), 1)
    out[f"sim_false_positives_{n}"] = sum(r.false_positives for r in runs)
    out[f"sim_runs_{n}"] = seeds
    out[f"sim_wall_s_{n}"] = round(time.perf_counter() - started, 1)


def measure_fp(n: int, periods: float, out: dict[str, Any]) -> None:
    fp = measure_false_positives(n, FP_LOSS, periods)
    out[f"sim_false_positive_rate_{n}"] = round(fp.per_hour, 3)
    out[f"sim_fp_declared_dead_{n}"] = fp.declared_dead
    out[f"sim_fp_false_suspicions_{n}"] = fp.false_suspicions
    out[f"sim_fp_refutations_{n}"] = fp.refutations
    out["sim_fp_periods"] = periods
    out["sim_fp_loss"] = FP_LOSS


def measure_real_nodes(n: int, out: dict[str, Any]) -> None:
    """The real-process half: converge_s_N, detect_dead_s_N, idle_cpu_pct_per_node_N and
    idle_bytes_per_s_per_node_N from N node.py processes on this machine
    (benchmarks/membership_nodes.py explains each)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from membership_nodes import measure

    out.update(measure(n, 20.0))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Membership benchmark (issue 18): the sans-IO SWIM core simulated at "
                    "several sizes; prints one JSON line.")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--no-nodes", action="store_true",
                        help="leave out the 30 real node processes (--quick does too)")
    parser.add_argument("--sim-nodes", help="simulated sizes (100,1000,10000)")
    parser.add_argument("--fp-periods", type=float,
                        help="periods of the false-positive run (3600: an hour)")
    args = parser.parse_args(argv)
    sizes: tuple[int, ...] = QUICK_SIZES if args.quick else SIZES
    if args.sim_nodes:
        sizes = tuple(int(x) for x in args.sim_nodes.split(","))
    args.sizes = sorted(sizes)
    args.fp_nodes = 100 if args.quick else 1000
    if args.fp_periods is None:
        args.fp_periods = 300.0 if args.quick else 3600.0
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    config = SwimConfig()
    out: dict[str, Any] = {
        "bench": "membership", "sim_sizes": args.sizes, "sim_joiners": JOINERS,
        "sim_crashes": CRASHES, "quick": args.quick,
        "swim_config": {k: v for k, v in asdict(config).items()
                        if k in ("period", "probe_timeout", "indirect_k", "suspicion_alpha",
                                 "suspicion_beta", "suspicion_k", "retransmit_mult",
                                 "max_updates", "sync_interval", "gossip_fanout")},
        "loadavg_1m_start": round(os.getloadavg()[0], 2),
    }
    steps: list[tuple[str, Any]] = [
        *[(f"simulate {n}", lambda n=n: measure_simulation(n, seeds_for(n, args.quick), out))
          for n in args.sizes],
        (f"false positives {args.fp_nodes}",
         lambda: measure_fp(args.fp_nodes, args.fp_periods, out)),
    ]
    for field in ("converge_s", "detect_dead_s", "idle_cpu_pct_per_node",
                  "idle_bytes_per_s_per_node"):
        out[f"{field}_{REAL_NODES}"] = None
    if args.no_nodes or args.quick:
        out["nodes_note"] = "real node processes not measured (--no-nodes or --quick)"
    else:
        steps.append(("nodes", lambda: measure_real_nodes(REAL_NODES, out)))
    error = run_steps(steps)
    small, large = args.sizes[0], args.sizes[-1]
    for what in ("detect", "converge"):
        a, b = out.get(f"sim_{what}_periods_{large}"), out.get(f"sim_{what}_periods_{small}")
        if a is not None and b is not None:
            out[f"sim_{what}_ratio_{large}_{small}"] = ratio(a, b)
    out["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    return finish("membership", out, error)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
