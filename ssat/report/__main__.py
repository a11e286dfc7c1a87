"""``python -m ssat.report <run or sweep dir>...``: a markdown table on stdout; report.md, report.csv and the plots
(robust_vs_budget.png, robust_vs_runtime.png, selection_pca.png) beside it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ssat.errors import DataError, SsatError
from ssat.report.table import collect_results, results_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssat.report", description=__doc__)
    parser.add_argument("paths", nargs="+", type=Path, help="run or sweep directories (searched for results.json)")
    parser.add_argument("--out", type=Path, help="folder for report.md, report.csv and the plots "
                                                 "(default: the first path)")
    parser.add_argument("--projection", type=Path, metavar="RUN_DIR",
                        help="the run whose selection selection_pca.png shows (default: the first with boundary "
                             "points)")
    args = parser.parse_args(argv)
    try:
        records = collect_results(args.paths)
        projection = None
        if args.projection is not None:
            projection = next((r for r in records if Path(r["run_dir"]).resolve() == args.projection.resolve()),
                              None)
            if projection is None:
                raise DataError(f"--projection {args.projection} is not one of the runs found")
        out = args.out or (args.paths[0] if args.paths[0].is_dir() else args.paths[0].parent)
        out.mkdir(parents=True, exist_ok=True)
        markdown = results_table(records)
        (out / "report.md").write_text(markdown)
        (out / "report.csv").write_text(results_table(records, fmt="csv"))
        from ssat.report.plots import draw_all  # matplotlib only when the tables are through

        plots = draw_all(records, out, projection)
    except SsatError as err:
        print(f"ssat.report: error: {err}", file=sys.stderr)
        return 2
    print(markdown, end="")
    print(f"\n{len(records)} runs; written {out / 'report.md'}, {out / 'report.csv'}, "
          f"{', '.join(p.name for p in plots)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
