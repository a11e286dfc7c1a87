"""``python -m ssat.report <run or sweep dir>...``: a markdown table on stdout, report.md and report.csv beside it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ssat.errors import SsatError
from ssat.report.table import collect_results, results_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssat.report", description=__doc__)
    parser.add_argument("paths", nargs="+", type=Path, help="run or sweep directories (searched for results.json)")
    parser.add_argument("--out", type=Path, help="folder for report.md and report.csv (default: the first path)")
    args = parser.parse_args(argv)
    try:
        records = collect_results(args.paths)
    except SsatError as err:
        print(f"ssat.report: error: {err}", file=sys.stderr)
        return 2
    out = args.out or (args.paths[0] if args.paths[0].is_dir() else args.paths[0].parent)
    out.mkdir(parents=True, exist_ok=True)
    markdown = results_table(records)
    (out / "report.md").write_text(markdown)
    (out / "report.csv").write_text(results_table(records, fmt="csv"))
    print(markdown, end="")
    print(f"\n{len(records)} runs; written {out / 'report.md'} and {out / 'report.csv'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
