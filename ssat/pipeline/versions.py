"""Each stage's version against a hash of the code it runs, checked in as versions.json beside this file.

A stage's key holds its version, so a change to what a stage computes must bump it, or a shared cache serves
results of the old code. The table makes that a test: when the code a stage depends on changes and its version
does not, tests/test_stage_versions.py fails and says what to do. The code of a stage is its module and every
ssat module it imports, directly or not, plus the packages it declares in ``Stage.code`` (what it builds from a
config's ``_target_``, which no import shows). Docstrings, comments and layout are not part of the hash.

    python -m ssat.pipeline.versions            # which stages changed
    python -m ssat.pipeline.versions --refresh  # write the table (after a version bump, or a change that keeps
                                                # every result: a rename, a message)
"""

from __future__ import annotations

import argparse
import ast
import functools
import hashlib
import json
from pathlib import Path

from ssat.pipeline.stage import Stage

TABLE = Path(__file__).with_name("versions.json")
PACKAGE = "ssat"


ROOT = Path(__file__).resolve().parents[1]  # the ssat package


def _module_file(name: str) -> Path | None:
    """The source file of an ssat module (``ssat.a.b``: a/b.py or a/b/__init__.py), None if it is not one."""
    parts = name.split(".")[1:]
    for path in (ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py")):
        if parts and path.is_file() or not parts and path.name == "__init__.py" and path.is_file():
            return path
    return None


def _imports(tree: ast.AST, module: str) -> set[str]:
    """The ssat modules a module imports (``from ssat.x import y`` counts ssat.x and, if it is one, ssat.x.y)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                base = ".".join(module.split(".")[:-node.level] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] == PACKAGE and _module_file(m) is not None}


def _package_modules(package: str) -> set[str]:
    folder = _module_file(package).parent
    return {".".join((package, *p.relative_to(folder).with_suffix("").parts)).removesuffix(".__init__")
            for p in folder.rglob("*.py")}


def _normalised(tree: ast.AST) -> str:
    """The module's code without its docstrings: what it does, not how it is described or laid out."""
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False)


def code_of(stage: Stage) -> dict[str, str]:
    """{module: hash of its code} for every module the stage depends on, found by following imports."""
    todo = {stage.run.__module__, *(m for package in stage.code for m in _package_modules(package))}
    seen: dict[str, str] = {}
    while todo:
        module = todo.pop()
        if module in seen or module.startswith("ssat.pipeline"):  # the runner's code is versioned by the keys
            continue
        seen[module], imported = _read(_module_file(module), module)
        todo |= imported
    return dict(sorted(seen.items()))


@functools.lru_cache(maxsize=None)
def _read(path: Path, module: str) -> tuple[str, frozenset[str]]:
    """A module's code hash and the ssat modules it imports."""
    tree = ast.parse(path.read_text())
    imported = frozenset(_imports(tree, module))
    return hashlib.sha256(_normalised(tree).encode()).hexdigest(), imported


def source_hash(stage: Stage) -> str:
    return hashlib.sha256(json.dumps(code_of(stage)).encode()).hexdigest()[:16]


def all_stages() -> dict[str, Stage]:
    """Every stage any plan can hold, by name (the generative selectors' stages included)."""
    from ssat.stages import data, embed, evaluate, generate, intermediate, pseudo_label, select, ssat

    stages = [data.DATA, data.POOL, intermediate.STAGE, embed.STAGE, select.STAGE, pseudo_label.STAGE, ssat.STAGE,
              evaluate.STAGE, generate.DDPM_PRETRAIN, generate.DDPM_SOURCE, generate.DDPM_FINETUNE, generate.SAMPLE,
              generate.SAMPLE_PLAIN, generate.GENERATED_POOL, intermediate.CHECKPOINT, generate.CLASSIFIER]
    # Stages that stand in for another of the same name (a trained model's, the data's pool) under their own.
    stand_ins = {"generated_pool": generate.GENERATED_POOL,
                 "intermediate_from_checkpoint": intermediate.FROM_CHECKPOINT}
    return {**{s.name: s for s in stages if s is not generate.GENERATED_POOL}, **stand_ins}


def current() -> dict[str, dict]:
    return {name: {"version": s.version, "source": source_hash(s)} for name, s in all_stages().items()}


def problems(table: dict[str, dict]) -> list[str]:
    """What a developer must do for each stage whose table entry no longer matches its code."""
    out = []
    for name, now in current().items():
        was = table.get(name)
        if was is None:
            out.append(f"stage {name} is not in {TABLE.name}: run python -m ssat.pipeline.versions --refresh")
        elif now["source"] != was["source"] and now["version"] == was["version"]:
            out.append(f"the code of stage {name} changed but its version ({now['version']}) did not: if what it "
                       f"computes changed, bump `version` in its Stage declaration; if not (a rename, a message), "
                       f"refresh the table; then run python -m ssat.pipeline.versions --refresh")
        elif now["version"] != was["version"]:
            out.append(f"stage {name} is at version {now['version']}, the table says {was['version']}: run "
                       f"python -m ssat.pipeline.versions --refresh")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssat.pipeline.versions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--refresh", action="store_true", help=f"write {TABLE.name} from the current code")
    args = parser.parse_args(argv)
    if args.refresh:
        TABLE.write_text(json.dumps(current(), indent=2, sort_keys=True) + "\n")
        print(f"wrote {TABLE}")
        return 0
    found = problems(json.loads(TABLE.read_text()) if TABLE.exists() else {})
    print("\n".join(found) or "every stage's version matches its code")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
