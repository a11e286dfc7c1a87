"""Results tables from run and sweep directories."""

from ssat.report.table import collect_results, results_table

__all__ = ["collect_results", "results_table"]
