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
from .contenders import BY_KEY, CONTENDERS, available
from .stats import channel_scaling, scaling, summarize, targets


def write_outputs(data: dict[str, Any], stem: str, readme: bool,
                  out: Path = RESULTS) -> list[dict[str, Any]]:
    summ = summarize(data)
    scal = scaling(data, summ)
    chan = channel_scaling(data, summ)
    tg = targets(summ, scal, data)
    data["summary"], data["scaling"], data["channel_scaling"], data["targets"] = summ, scal, chan, tg
    out.mkdir(parents=True, exist_ok=True)
    # the rounds first: a report that fails can be rebuilt with --report-only
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    md, section = render(data, summ, scal, tg, f"{stem}.png", chan)
    (out / f"{stem}.md").write_text(md)
    plot(data, summ, scal, out / f"{stem}.png")
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
    ap.add_argument("--only", metavar="KEYS",
                    help="comma-separated contenders to run (see --list), e.g. "
                         "fastsave-default,libvirt-raw")
    ap.add_argument("--list", action="store_true",
                    help="list the contenders, which this stack can run and why not, and exit")
    ap.add_argument("--out-dir", metavar="DIR", type=Path, default=RESULTS,
                    help=f"where STEM.{{md,json,png}} go (default {RESULTS})")
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
    only = args.only.split(",") if args.only else None
    if only and any(k not in BY_KEY for k in only):
        ap.error(f"--only: unknown {', '.join(k for k in only if k not in BY_KEY)} (see --list)")
    if args.list:
        import libvirt

        run, left, offers = available(libvirt.getVersion(), only)
        keys = {c.key for c in run}
        dch = offers["default_channels"]
        print(f"fastsave's default channel count: {dch if dch else 'chosen per save'}")
        for c in CONTENDERS:
            if only and c.key not in only:
                continue
            state = ("run" if c.key in keys else
                     f"= {offers['same_as'][c.key]} (fastsave's default channel count)"
                     if c.key in offers["same_as"] else f"not available: {left.get(c.key, '?')}")
            print(f"{c.key:24} {c.label:40} {state}")
        return 0
    if args.report_only:
        data = json.loads(Path(args.report_only).read_text())
        for k in ("summary", "scaling", "targets"):
            data.pop(k, None)
    else:
        if os.geteuid() != 0:
            print("the scoreboard runs QEMU guests on the embedded libvirt driver: run it as root",
                  file=sys.stderr)
            return 2
        runner = Runner(args.quick, args.rounds, guests, only)
        data = runner.run()
    stem = args.out_name or ("compare-quick" if data["meta"]["quick"] else "compare")
    readme = args.readme if args.readme is not None else (
        args.out_dir.resolve() == RESULTS.resolve()  # results elsewhere: not the README's
        and (bool(args.out_name) or not data["meta"]["quick"]))
    tg = write_outputs(data, stem, readme, args.out_dir)
    if not args.report_only:
        runner.say("done")
    print()
    for t in tg:
        print(t["line"])
        if t.get("why"):
            print("    " + t["why"])
    print(f"\nwritten: {args.out_dir / (stem + '.md')}, .json, .png"
          + (f"; README section in {README}" if readme else ""))
    fails = [r for r in data["rounds"] if not r.get("ok")]
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
