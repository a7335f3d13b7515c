"""Ingest of two code trees, alternating on one backlog: before and after a change, measured as `lakehouse bench`'s
ingest part measures (the pipeline's JSON report, first micro-batch's start to last one's end), each run on a lake of
its own and the same Kafka records. Alternating runs on one backlog keep the machine's drift out of the ratio.

    git worktree add /tmp/before <commit>; ln -s "$PWD/.lakehouse" /tmp/before/.lakehouse
    .venv/bin/python -m bench.ab_ingest --tree before=/tmp/before --tree after=. --rounds 2

With `--reuse`, a second comparison on the same backlog skips its production (about four minutes).

Each tree runs with its own code (`python -m lakehouse` from the tree) and this checkout's settings and jars. Prints a
JSON line per run, then the median readings/s of each tree and the ratio of the last to the first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from bench.memory import PeakSampler
from bench.processes import env_for
from bench.run import _produce, ingest_messages


def main() -> None:
    from lakehouse import settings as load_settings
    from pipeline.kafka.broker import LocalBroker

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH of a checkout (repeatable)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--mib", type=int, default=1024, help="size of the backlog")
    parser.add_argument("--metrics", type=int, default=0, help="metrics per reading (0: the tutorial's value)")
    parser.add_argument("--port", type=int, default=19492, help="port of the benchmark's own Kafka broker")
    parser.add_argument("--folder", type=Path, default=Path("data/ab-ingest"))
    parser.add_argument(
        "--reuse", action="store_true", help="keep the backlog a former run with the same --mib and --metrics left"
    )
    args = parser.parse_args()
    trees = [(name, Path(path).resolve()) for name, _, path in (tree.partition("=") for tree in args.tree)]

    base = load_settings().model_copy(
        update={"kafka_bootstrap": f"localhost:{args.port}", "spark_master": "local[2]", "topic": "ab-ingest"}
    )
    folder = args.folder.resolve()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    broker = LocalBroker.from_settings(base)
    broker.stop()
    produced = broker.folder / "ab-ingest-backlog"
    backlog = f"{args.mib} MiB, {args.metrics} metrics"
    reuse = args.reuse and produced.exists() and produced.read_text() == backlog
    if not reuse:
        shutil.rmtree(broker.folder, ignore_errors=True)
    broker.start()
    rates: dict[str, list[float]] = {name: [] for name, _ in trees}
    try:
        if not reuse:
            payloads = ingest_messages(args.mib, base.max_message_bytes, args.metrics)
            _produce(base, payloads)
            del payloads
            produced.write_text(backlog)
        for round_ in range(args.rounds):
            for name, tree in trees:
                run = folder / f"{name}-{round_}"
                settings = base.model_copy(update={"lake_root": str(run / "lake"), "checkpoint_root": None})
                report = run / "batches.jsonl"
                run.mkdir(parents=True)
                with (run / "pipeline.log").open("ab") as log:
                    pipeline = subprocess.Popen(
                        [sys.executable, "-m", "lakehouse", "pipeline", "--available-now", "--report", str(report)],
                        cwd=tree,
                        env=env_for(settings, {"PYTHONPATH": str(tree)}),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                    with PeakSampler(pipeline.pid) as memory:
                        pipeline.wait()
                if pipeline.returncode != 0:
                    raise SystemExit(f"{name}: the pipeline failed; see {run / 'pipeline.log'}")
                batches = [json.loads(line) for line in report.read_text().splitlines()]
                seconds = batches[-1]["finished_at"] - (batches[0]["finished_at"] - batches[0]["seconds"])
                readings = sum(batch["readings"] for batch in batches)
                stages: dict[str, float] = {}
                for batch in batches:
                    for stage, spent in batch["stages"].items():
                        stages[stage] = round(stages.get(stage, 0.0) + spent, 1)
                rates[name].append(readings / seconds)
                line = {"tree": name, "round": round_, "readings": readings, "seconds": round(seconds, 1)}
                line |= {"readings_per_s": round(readings / seconds), "stages": stages}
                print(json.dumps(line | {"memory": memory.describe().split(";")[0]}), flush=True)
                shutil.rmtree(run / "lake", ignore_errors=True)
    finally:
        broker.stop()
    medians = {name: statistics.median(values) for name, values in rates.items()}
    first, last = trees[0][0], trees[-1][0]
    summary = ", ".join(f"{name} {value:,.0f} readings/s" for name, value in medians.items())
    print(f"medians: {summary}; {last} / {first} = {medians[last] / medians[first]:.2f}")


if __name__ == "__main__":
    main()
