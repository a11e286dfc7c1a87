"""``python -m ssat.evaluate <run dir or model file> [overrides]``: the evaluate stage alone, as RobustBench
evaluates a model: clean and AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square) accuracy on the whole test set
at L-infinity eps 8/255, with ssat's PGD and sanity checks beside them, in resumable chunks under ``cache_dir``
(a killed evaluation, rerun, attacks only the chunks still missing). Writes ``model_card.json``: the fields of a
RobustBench model card and ssat's own (selector, budget, pool size, seconds).

    python -m ssat.evaluate outputs/2026-12-02/10-00-00-000000_123_lcs_km_0.2      # a run directory
    python -m ssat.evaluate lab_wrn.pt dataset=cifar10 model=wrn28_10 trainer=gpu  # any model file
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

from ssat.cache import StageCache, check_writable, write_json_atomic
from ssat.config import compose_job
from ssat.errors import FAILED, SsatError, during_work
from ssat.pipeline import check_autoattack
from ssat.pipeline.runner import Runner
from ssat.run_dir import Target, target, target_parser
from ssat.stages import evaluate
from ssat.stages.data import DATA
from ssat.stages.model_file import file_stage, saved_stage

log = logging.getLogger("ssat")

EPS = 8 / 255
# RobustBench's evaluation, composed after the run's overrides and before the user's (which win).
ROBUSTBENCH = [f"eval.pgd.eps={EPS!r}", "eval.autoattack.eps=${eval.pgd.eps}", "eval.autoattack.enabled=true",
               "eval.autoattack.version=standard", "eval.autoattack.num_points=null", "test_size=null"]
MODEL_FILE = "model_file"  # the config key that holds the file (in no key: the file's sha256 is)
EVALUATED = file_stage("evaluated_model", MODEL_FILE, argument=True)
# The evaluate stage reads the model of a stage named ssat: here the file's.
SSAT = saved_stage("ssat", EVALUATED)
CARD = "model_card.json"


def config(target: Target, overrides: list[str]) -> tuple[DictConfig, dict[str, str]]:
    """The run's config (or the one ``overrides`` compose for a file) with RobustBench's evaluation, the user's
    overrides last; and the groups' choices."""
    cfg, choices = compose_job([*target.run_overrides, *ROBUSTBENCH, *overrides])
    with open_dict(cfg):
        cfg[MODEL_FILE] = str(target.model_file)
    return cfg, choices


def run_evaluation(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """The data, the file's model and the evaluate stage, through the stage cache: {stage: StageResult}."""
    check_writable(cfg.cache_dir, "cache_dir")
    runner = Runner(cfg, StageCache(cfg.cache_dir), out_dir)
    data = runner.run([DATA])["data"].value
    if cfg.dataset.num_classes is None:  # the model is built with it
        cfg.dataset.num_classes = data.num_classes
    check_autoattack(cfg, data)
    return runner.run([DATA, EVALUATED, SSAT, evaluate.STAGE])


def eps_text(eps: float) -> str:
    """8/255 as RobustBench's cards write it, any other eps as a number."""
    steps = eps * 255
    return f"{round(steps)}/255" if abs(steps - round(steps)) < 1e-6 else f"{eps:g}"


def percent(acc: float | None) -> str | None:
    """An accuracy as RobustBench's cards hold it: a percentage string with two decimals."""
    return None if acc is None else str(round(acc * 100, 2))


def extra_data(results: dict[str, Any] | None, pool: str | None) -> bool | None:
    """RobustBench's additional_data: False when the unlabeled pool was carved from the training set or generated
    (RobustBench counts generated images as no extra data); unknown (None) for a pool from files, which may be
    either (--additional-data says)."""
    if results is None:
        return None
    return False if pool == "split" or results.get("n_generated") else None


def model_card(cfg: DictConfig, choices: dict[str, str], target: Target, stages: dict, name: str | None,
               additional_data: bool | None) -> dict[str, Any]:
    """RobustBench's model card fields (robustbench.utils.ModelInfo), its threat model, and ssat's own."""
    ev, run = stages["evaluate"].info, target.results or {}
    loaded = stages[EVALUATED.name].value
    aa = cfg.eval.autoattack
    generated = run.get("n_generated") or 0
    return {
        "name": name or target.name, "link": None, "authors": None, "venue": None,
        "dataset": cfg.dataset.name, "threat_model": "Linf",
        "eps": eps_text(aa.eps if aa.enabled else cfg.eval.pgd.eps),
        "architecture": loaded.model.architecture,
        "additional_data": additional_data if additional_data is not None else extra_data(target.results,
                                                                                           choices.get("pool")),
        "number_forward_passes": 1,
        "clean_acc": percent(ev["clean_acc"]), "autoattack_acc": percent(ev.get("autoattack_acc")), "reported": None,
        "footnote": f"It uses {generated} generated images in training." if generated else None,
        "ssat": {
            "selector": run.get("selector"), "budget": run.get("budget"), "pool_size": run.get("n_pool"),
            "n_selected": run.get("n_selected"), "total_seconds": run.get("total_seconds"),
            "model": choices.get("model"), "model_file": loaded.path, "model_sha256": loaded.sha256,
            "clean_acc": ev["clean_acc"], "autoattack_acc": ev.get("autoattack_acc"),
            "autoattack_version": aa.version if aa.enabled else None,
            "autoattack_num_points": ev.get("autoattack_num_points"), "autoattack_warnings": ev.get(
                "autoattack_warnings", []),
            "pgd_acc": ev["robust_acc"], "pgd": {k: cfg.eval.pgd[k] for k in ("eps", "alpha", "steps", "loss",
                                                                             "restarts")},
            "num_test": ev["num_test"], "sanity_passed": ev["sanity"]["passed"], "sanity": ev["sanity"],
            "evaluate_seconds": stages["evaluate"].seconds, "evaluate_dir": str(stages["evaluate"].path),
        },
    }


def summary(card: dict[str, Any]) -> str:
    own = card["ssat"]
    lines = [f"{card['name']}: {card['architecture']} on {card['dataset']} ({own['num_test']} test images), "
             f"Linf eps {card['eps']}",
             f"  clean       {card['clean_acc']}%",
             f"  AutoAttack  {card['autoattack_acc']}%" + (f" ({own['autoattack_version']}, "
                                                           f"{own['autoattack_num_points']} points)"
                                                           if own["autoattack_version"] else " (off)"),
             f"  PGD-{own['pgd']['steps']}      {round(own['pgd_acc'] * 100, 2)}% (ssat's, {own['pgd']['loss']})",
             f"  sanity      {'passed' if own['sanity_passed'] else 'FAILED: ' + ', '.join(own['sanity']['failed'])}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = target_parser("python -m ssat.evaluate", __doc__)
    parser.add_argument("--out", type=Path, help=f"the model card (default: <run dir>/{CARD}, or "
                                                 f"<file>.{CARD} beside a model file)")
    parser.add_argument("--name", help="the card's model name (default: the run directory's or file's name)")
    parser.add_argument("--additional-data", choices=("true", "false"),
                        help="whether training used data beyond the training set (default: false for a pool from "
                             "the training set or generated; unknown otherwise)")
    args = parser.parse_args(argv)
    if not logging.root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        found = target(args.target)
        cfg, choices = config(found, args.overrides)
        out = args.out or (found.folder / CARD if found.results is not None
                           else found.folder / f"{found.name}.{CARD}")
        stages = run_evaluation(cfg, out.parent)
        card = model_card(cfg, choices, found, stages, args.name,
                          None if args.additional_data is None else args.additional_data == "true")
        with during_work():
            out.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(out, card)
    except SsatError as err:
        print(f"ssat.evaluate: error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        print(f"ssat.evaluate: error: could not write {err.filename}: {err.strerror}", file=sys.stderr)
        return FAILED
    print(summary(card))
    print(f"model card: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
