"""``python -m ssat.report <run or sweep dir>...``: a markdown table on stdout; report.md, report.csv and the plots
(robust_vs_budget.png, robust_vs_runtime.png, selection_pca.png) beside it; with ``--wandb`` the table and the
plots also go to the W&B group the runs logged to."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ssat.errors import DataError, SsatError
from ssat.report.table import collect_results, results_table


def write_report(paths: list[Path], out: Path, projection: Path | None = None
                 ) -> tuple[list[dict[str, Any]], str, list[Path]]:
    """report.md, report.csv and the plots of the runs under ``paths`` in ``out``: the records, the markdown table
    and the plots' paths."""
    records = collect_results(paths)
    chosen = None
    if projection is not None:
        chosen = next((r for r in records if Path(r["run_dir"]).resolve() == projection.resolve()), None)
        if chosen is None:
            raise DataError(f"--projection {projection} is not one of the runs found")
    out.mkdir(parents=True, exist_ok=True)
    markdown = results_table(records)
    (out / "report.md").write_text(markdown)
    (out / "report.csv").write_text(results_table(records, fmt="csv"))
    from ssat.report.plots import draw_all  # matplotlib only when the tables are through

    return records, markdown, draw_all(records, out, chosen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssat.report", description=__doc__)
    parser.add_argument("paths", nargs="+", type=Path, help="run or sweep directories (searched for results.json)")
    parser.add_argument("--out", type=Path, help="folder for report.md, report.csv and the plots "
                                                 "(default: the first path)")
    parser.add_argument("--projection", type=Path, metavar="RUN_DIR",
                        help="the run whose selection selection_pca.png shows (default: the first with boundary "
                             "points)")
    parser.add_argument("--wandb", action="store_true",
                        help="also log the table and the plots as a 'report' run of the runs' W&B group")
    parser.add_argument("--wandb-project", help="W&B project (default: the runs' own, else ssat)")
    parser.add_argument("--wandb-entity", help="W&B entity (default: the runs' own)")
    parser.add_argument("--wandb-group", help="W&B group (default: the runs' own: a sweep's date/time)")
    args = parser.parse_args(argv)
    try:
        out = args.out or (args.paths[0] if args.paths[0].is_dir() else args.paths[0].parent)
        records, markdown, plots = write_report(args.paths, out, args.projection)
        if args.wandb:
            from ssat.report.dashboard import destination, publish

            where = destination(args.paths[0], args.wandb_project, args.wandb_entity, args.wandb_group)
            folder = publish(records, plots, where, out)
    except SsatError as err:
        print(f"ssat.report: error: {err}", file=sys.stderr)
        return 2
    print(markdown, end="")
    print(f"\n{len(records)} runs; written {out / 'report.md'}, {out / 'report.csv'}, "
          f"{', '.join(p.name for p in plots)}", file=sys.stderr)
    if args.wandb:
        print(f"logged to W&B project {where.project}, group {where.group} ({folder})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
