"""Time the README's two commands as a newcomer runs them: each on its own fresh clone of
the committed HEAD (no .venv, no classifier cache), set-up included.

    python benchmarks/suite_time.py            # both; writes benchmarks/results/suite_time.md
    python benchmarks/suite_time.py --only test

Run it on a quiet machine (it reports the load average before and after): both commands
are CPU-bound, and anything else running inflates the times. Needs only the standard
library, so it runs before any virtual environment exists.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BUDGET_S = 8 * 60  # the target for each command, set-up included


def run_fresh(target: str, workdir: Path) -> dict:
    """`make TARGET` in a new clone; the set-up (venv + install) is timed apart from the rest
    by running its stamp target first, so the table shows where the time goes."""
    clone = workdir / target
    subprocess.run(["git", "clone", "-q", "--no-local", str(ROOT), str(clone)], check=True)
    # a private cache: the demo's digit classifier is trained as on a fresh machine
    env = {**os.environ, "RQGEN_CACHE": str(workdir / f"cache-{target}")}
    t0 = time.monotonic()
    setup = subprocess.run(["make", ".venv/.installed-stamp"], cwd=clone, env=env,
                           capture_output=True, text=True)  # fmt: skip
    t1 = time.monotonic()
    if setup.returncode:
        sys.exit(f"set-up failed:\n{setup.stderr[-2000:]}")
    log = clone / f"{target}.log"
    with open(log, "w") as f:
        proc = subprocess.run(["make", target], cwd=clone, env=env, stdout=f,
                              stderr=subprocess.STDOUT)  # fmt: skip
    t2 = time.monotonic()
    text = log.read_text(errors="replace")
    result = {"setup_s": round(t1 - t0, 1), "run_s": round(t2 - t1, 1),
              "total_s": round(t2 - t0, 1), "returncode": proc.returncode}  # fmt: skip
    summary = re.findall(r"^=*\s*(\d+ (?:passed|failed).* in [\d.]+s\b.*?)\s*=*$", text, re.M)
    if summary:
        result["pytest"] = summary[-1]
    if proc.returncode:
        result["log_tail"] = text[-3000:]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=["test", "demo"])
    p.add_argument("--keep", action="store_true", help="keep the clones (print their path)")
    args = p.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    load_before = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory(prefix="rqgen-suite-") as tmp:
        for target in [args.only] if args.only else ["test", "demo"]:
            print(f"make {target} on a fresh clone of {commit} ...", flush=True)
            results[target] = run_fresh(target, Path(tmp))
            print(json.dumps(results[target]), flush=True)
        if args.keep:
            keep = Path(tempfile.mkdtemp(prefix="rqgen-suite-kept-"))
            subprocess.run(["cp", "-a", tmp + "/.", str(keep)], check=True)
            print(f"clones kept in {keep}")
    load_after = os.getloadavg()

    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    rows = "\n".join(
        f"| `make {t}` | {r['setup_s']:.0f} | {r['run_s']:.0f} | {r['total_s']:.0f} "
        f"({r['total_s'] / 60:.1f} min) | {'yes' if r['total_s'] <= BUDGET_S else 'NO'} | "
        f"{r.get('pytest', 'exit ' + str(r['returncode']))} |"
        for t, r in results.items()
    )  # fmt: skip
    meta = {
        "commit": commit + (" (uncommitted changes not included)" if dirty else ""),
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()},
        "load_average_1m_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "date": datetime.now(timezone.utc).isoformat()[:19] + "Z",
        "command": "python benchmarks/suite_time.py" + (f" --only {args.only}" * bool(args.only)),
    }  # fmt: skip
    md = (
        f"# The README's two commands on a fresh clone\n\n"
        f"Machine: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"1-minute load average {meta['load_average_1m_before_after'][0]} before, "
        f"{meta['load_average_1m_before_after'][1]} after (the run's own load).\n\n"
        f"Command: `{meta['command']}` (commit {meta['commit']}, {meta['date']}). Each "
        "command runs in its own `git clone` with no `.venv` and an empty `RQGEN_CACHE`; "
        "set-up is `make .venv/.installed-stamp` (venv, pip, the CPU torch wheel, the "
        "package), timed apart.\n\n"
        f"| command | set-up s | run s | total s | ≤ {BUDGET_S // 60} min | result |\n"
        "|---|---|---|---|---|---|\n" + rows + "\n"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "suite_time" + (f"_{args.only}" if args.only else "")
    (RESULTS / f"{name}.md").write_text(md)
    (RESULTS / f"{name}.json").write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    print(md)
    if any(r["returncode"] for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
