"""The command line: `python -m benchmarks.scoreboard` (see the package's
docstring); `--agent ROOT` is the agent process the runner starts."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from . import README, RESULTS, __doc__ as PACKAGE_DOC
from .agent import agent_main
from .guests import GUESTS
from .markdown import render
from .plot import plot
from .readme import update_readme
from .runner import Runner
from .stats import scaling, summarize, targets


def write_outputs(data: dict[str, Any], stem: str, readme: bool) -> list[dict[str, Any]]:
    summ = summarize(data)
    scal = scaling(data, summ)
    tg = targets(summ, scal)
    data["summary"], data["scaling"], data["targets"] = summ, scal, tg
    RESULTS.mkdir(exist_ok=True)
    md, section = render(data, summ, scal, tg, f"{stem}.png")
    (RESULTS / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text(md)
    plot(data, summ, scal, RESULTS / f"{stem}.png")
    if readme:
        update_readme(section, stem)
    return tg


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scoreboard",
                                 description=PACKAGE_DOC.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 512 MiB and 1.5 GiB guests, one round; writes compare-quick.*")
    ap.add_argument("--rounds", type=int, metavar="N",
                    help="rounds per guest (default: 1 with --quick, else each guest's own)")
    ap.add_argument("--guests", metavar="KEYS",
                    help=f"comma-separated guests to run (of {', '.join(GUESTS)})")
    ap.add_argument("--out-name", metavar="STEM",
                    help="write benchmarks/results/STEM.{md,json,png} (default compare, "
                         "compare-quick with --quick), e.g. compare-debian13")
    ap.add_argument("--readme", action=argparse.BooleanOptionalAction, default=None,
                    help="put the results into README.md's results section (its own block per "
                         "STEM; default: only for a full run and for --out-name)")
    ap.add_argument("--agent", metavar="ROOT", help=argparse.SUPPRESS)
    ap.add_argument("--format", help=argparse.SUPPRESS)
    ap.add_argument("--report-only", metavar="JSON",
                    help="rebuild the tables, chart and README section from a saved JSON")
    args = ap.parse_args()
    if args.agent:
        return agent_main(args.agent, args.format)
    guests = args.guests.split(",") if args.guests else None
    if guests and any(k not in GUESTS for k in guests):
        ap.error(f"--guests: known guests are {', '.join(GUESTS)}")
    if args.report_only:
        data = json.loads(Path(args.report_only).read_text())
        for k in ("summary", "scaling", "targets"):
            data.pop(k, None)
    else:
        if os.geteuid() != 0:
            print("the scoreboard runs QEMU guests on the embedded libvirt driver: run it as root",
                  file=sys.stderr)
            return 2
        runner = Runner(args.quick, args.rounds, guests)
        data = runner.run()
    stem = args.out_name or ("compare-quick" if data["meta"]["quick"] else "compare")
    readme = args.readme if args.readme is not None else bool(args.out_name) or not data["meta"]["quick"]
    tg = write_outputs(data, stem, readme)
    if not args.report_only:
        runner.say("done")
    print()
    for t in tg:
        print(t["line"])
    print(f"\nwritten: {RESULTS / (stem + '.md')}, .json, .png"
          + (f"; README section in {README}" if readme else ""))
    fails = [r for r in data["rounds"] if not r.get("ok")]
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
