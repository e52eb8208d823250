"""The runs of experiments/gating-<stream>.yaml's sweep as ``metagate run`` commands, one a line, in the order they were
run for docs/gating.md (seed by seed, the new methods before the baselines), so that two at a time (``xargs -P 2``)
finish the most informative runs first on a loaded machine; each run is the sweep's (variant, seed) exactly.

    python experiments/gating/queue.py OUT permuted split | xargs -P 2 -I CMD sh -c CMD
"""

from __future__ import annotations

import json
import sys

import yaml

SKIP = ("metagate",)  # not run for docs/gating.md: no time left on the loaded machine (said there)
NEW = ("hat", "packnet", "supsup", "supsup-transfer", "supsup-oneshot", "wsn", "supsup-oneshot-1", "supsup-oneshot-16")


def commands(out: str, stream: str, python: str) -> list[tuple[int, int, str]]:
    spec = yaml.safe_load(open(f"experiments/gating-{stream}.yaml"))["sweep"]
    skip = set(SKIP)
    rows = []
    for order, entry in enumerate(spec["methods"]):
        label, _, method = entry.partition("=")
        method = method or label
        if label in skip:
            continue
        overrides = [f"method.name={method}"]
        for key, values in spec["grid"].items():
            who, _, dotted = key.rpartition(":")
            if who == label:
                v = values[0]
                overrides.append(f"{dotted}={json.dumps(v).replace(' ', '') if isinstance(v, list) else v if not isinstance(v, bool) else str(v).lower()}")
        for seed in range(spec["seeds"]):
            cmd = (f"env PYTHONPATH=src OMP_NUM_THREADS=1 {python} -m metagate.cli run experiments/gating-{stream}.yaml "
                   f"{' '.join(overrides)} seed={seed} --out {out}/{stream}/{label}/seed{seed} > {out}/{stream}-{label}-seed{seed}.log 2>&1")
            rows.append((0 if label in NEW else 1, seed, cmd))
    return rows


if __name__ == "__main__":
    out, streams = sys.argv[1], sys.argv[2:]
    python = sys.executable
    rows = [r for s in streams for r in commands(out, s, python)]
    for _, _, cmd in sorted(rows, key=lambda r: (r[0], r[1])):
        print(cmd)
