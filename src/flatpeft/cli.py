"""The ``flatpeft`` command: a thin argparse layer over typed functions.

    flatpeft train CONFIG [--set k=v ...] [--output-dir D] [--overwrite]
    flatpeft eval RUN_DIR [--data PATH] [--splits test,val]
    flatpeft compare CONFIG --methods base,sam,flatpo,eflat-lora --seeds 3 [--set ...] [--output-dir D]
                     [--overwrite | --resume [--keep-other-code]]
    flatpeft data prepare [--only NAMES] [--force]
    flatpeft data verify [--only NAMES]         check the prepared assets' sizes and sha256
    flatpeft config CONFIG [--set ...]          print the resolved config (validation only)
    flatpeft methods / flatpeft tasks           list what is registered
    flatpeft configs [NAME] [--path]            list the built-in configs, or print one (or its path)
    flatpeft docs [PAGE]                        where the shipped Markdown docs are, or print one page

CONFIG is a YAML file or the name of a built-in config (``flatpeft train finefoods_fewshot``; a file of that
name in the current directory wins): see :mod:`flatpeft.resources`.

Other parts add sub-commands: every module of :data:`PLUGIN_MODULES` that imports gets
``register_cli(subparsers)`` called; each of its sub-commands sets ``func`` with ``set_defaults``.
User errors (``ValueError``: bad config, missing file, existing run, a diverged run; ``AssetMissingError``) print
``flatpeft: error: ...`` and exit with status 2, and so do file-system faults (disk full, a folder that cannot be
written, a name too long: one line naming the path and what to do); ``compare`` exits with 2 after its tables are
written when a run failed; Ctrl-C exits with 130 after the finished runs' tables are written.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main", "build_parser", "PLUGIN_MODULES"]

#: Modules that may register more sub-commands (``register_cli(subparsers)``); skipped when absent.
PLUGIN_MODULES: list[str] = ["flatpeft.analysis.commands", "flatpeft.experiments.suite"]


def _output_dir(text: str) -> Path:
    """``--output-dir``: a non-empty path (``Path("")`` would silently mean the current directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty (give a directory)")
    return Path(text)


def _load_checked(args: argparse.Namespace, methods: list[str] | None = None):
    """The config of ``args.config`` with ``--set`` and ``--output-dir`` applied, validated by
    :func:`~flatpeft.experiments.runner.validate_config`: ``config``, ``train`` and ``compare`` refuse alike."""
    from flatpeft.experiments.config import load_config
    from flatpeft.experiments.runner import validate_config

    cfg = load_config(args.config, args.overrides)
    if args.output_dir is not None:
        cfg.output_dir = str(args.output_dir)
    validate_config(cfg, methods)
    return cfg


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path,
                   help="experiment YAML file, or the name of a built-in config (`flatpeft configs` lists them, "
                        "e.g. finefoods_fewshot); every key: `flatpeft docs cli`")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE",
                   help="override a config field (value parsed as YAML), e.g. --set train.steps=100 "
                        "--set method.rho=0.1; repeatable")
    p.add_argument("--output-dir", type=_output_dir, default=None,
                   help="run directory (default: output_dir of the config)")


def _cmd_train(args: argparse.Namespace) -> int:
    from flatpeft.experiments.runner import train_run

    cfg = _load_checked(args)
    metrics = train_run(cfg, out_dir=args.output_dir, overwrite=args.overwrite, progress=not args.quiet)
    out = Path(args.output_dir or cfg.output_dir).expanduser()
    print(json.dumps(metrics, indent=2, sort_keys=True))
    print(f"run written to {out}", file=sys.stderr)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from flatpeft.experiments.runner import evaluate_run

    splits = [s for s in args.splits.split(",") if s]
    metrics = evaluate_run(args.run_dir, data=args.data, splits=splits)
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


def _parse_seeds(text: str) -> int | list[int]:
    """``"3"`` -> 3 seeds (train.seed, +1, +2); ``"0,4,7"`` -> those seeds."""
    try:
        if "," in text:
            return [int(s) for s in text.split(",") if s.strip()]
        n = int(text)
    except ValueError:
        raise ValueError(f"--seeds expects a count (3) or a comma list (0,1,5), got {text!r}") from None
    if n < 1:
        raise ValueError(f"--seeds must be at least 1, got {n}")
    return n


def _cmd_compare(args: argparse.Namespace) -> int:
    from flatpeft.experiments.runner import compare

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    cfg = _load_checked(args, methods or None)
    result = compare(cfg, methods, _parse_seeds(args.seeds), out_dir=args.output_dir, overwrite=args.overwrite,
                     resume=args.resume, progress=not args.quiet, keep_other_code=args.keep_other_code)
    print(result.markdown)
    print("written: " + ", ".join(str(p) for p in result.paths.values()), file=sys.stderr)
    if result.failed:
        runs = ", ".join(f"{r['method']} seed {r['seed']} (step {r['step']})" for r in result.failed.values())
        print(f"flatpeft: error: {len(result.failed)} run(s) failed: {runs}; the tables mark them as failed",
              file=sys.stderr)
        return 2
    return 0


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from flatpeft import assets

    names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    multimodal = names is not None and "multimodal" in names
    if names is not None:
        names = [n for n in names if n != "multimodal"]
    paths = assets.prepare(names, force=args.force) if names is None or names else {}
    if multimodal:  # the pre-alignment checkpoints of the built-in multimodal tasks (minutes on a CPU)
        from flatpeft.multimodal import prepare_multimodal

        paths.update(prepare_multimodal(force=args.force))
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _cmd_data_verify(args: argparse.Namespace) -> int:
    from flatpeft import assets

    names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    for name, state in assets.verify(names).items():
        print(f"{name}: {state}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from flatpeft.experiments.config import config_to_dict, dump_yaml

    cfg = _load_checked(args)  # exactly the checks train runs before loading the model
    print(dump_yaml(config_to_dict(cfg)), end="")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    import flatpeft

    from flatpeft.optim.registry import methods_table

    if getattr(args, "markdown", False):
        print(methods_table())
        return 0
    for name in flatpeft.method_names():
        info = flatpeft.get_method(name)
        defaults = info.method_defaults()
        if defaults.get("rho_min", 0) is None:
            defaults["rho_min"] = f"{info.rho_min_fraction:g}*rho"
        kw = ", ".join(f"{k}={v!r}" if not str(v).endswith("*rho") else f"{k}={v}" for k, v in defaults.items())
        print(f"{name:18s} {info.passes} pass{'es' if info.passes == 2 else '  '}  {info.summary}" + (f"  [{kw}]" if kw else ""))
        if info.ranks != "-":
            print(f"{'':18s}           ranks: {info.ranks}")
    return 0


def _cmd_tasks(args: argparse.Namespace) -> int:
    from flatpeft.experiments.tasks import available_tasks, get_task

    for name in available_tasks():
        doc = (get_task(name).__doc__ or "").strip().splitlines()
        print(f"{name:22s} {doc[0] if doc else ''}")
    from flatpeft.resources import builtin_configs

    names = [n for n in builtin_configs() if "/" not in n and n != "suite"]
    if names:
        example = "finefoods_fewshot" if "finefoods_fewshot" in names else names[0]
        print(f"\nbuilt-in configs (run by name, e.g. flatpeft train {example}; flatpeft configs): {', '.join(names)}")
    return 0


def _cmd_configs(args: argparse.Namespace) -> int:
    from flatpeft.resources import builtin_configs, config_summary, missing_config_hint

    configs = builtin_configs()
    if args.name is None:
        for name, path in configs.items():
            kind, about = config_summary(path)
            print(f"{name:20s} {kind:11s} {about}")
        return 0
    if args.name not in configs:
        raise ValueError(f"configs: no built-in config {args.name!r}{missing_config_hint(args.name)}")
    print(configs[args.name] if args.path else configs[args.name].read_text(encoding="utf-8"), end="\n" if args.path else "")
    return 0


def _cmd_docs(args: argparse.Namespace) -> int:
    from flatpeft.resources import doc_pages, docs_dir

    pages = doc_pages()
    if args.page is None:
        print(docs_dir())
        for page in pages:
            print(f"  {page}")
        return 0
    name = args.page.removesuffix(".md").removeprefix("docs/")
    if name not in pages:
        raise ValueError(f"docs: no page {args.page!r} (pages: {', '.join(pages) or 'none shipped'})")
    print(pages[name].read_text(encoding="utf-8"), end="")
    return 0


def _register_plugins(sub: argparse._SubParsersAction) -> list[str]:
    """Call ``register_cli(sub)`` of every importable module in :data:`PLUGIN_MODULES`; return failures."""
    problems = []
    for module in PLUGIN_MODULES:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name and module.startswith(err.name):
                continue  # that part is not installed / not written: no sub-commands from it
            problems.append(f"{module}: {err}")
            continue
        except Exception as err:  # noqa: BLE001 - a broken plug-in must not take the whole CLI down
            problems.append(f"{module}: {type(err).__name__}: {err}")
            continue
        register = getattr(mod, "register_cli", None)
        if register is not None:
            register(sub)
    return problems


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (built-in sub-commands plus the plug-ins')."""
    parser = argparse.ArgumentParser(
        prog="flatpeft",
        description="Flatness-aware parameter-efficient fine-tuning: train, evaluate and compare methods "
                    "(base, sam, asam, flatpo, flat-lora, eflat-lora, ...) on peft models.")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("train", help="fine-tune one method with one seed",
                       description="Train the method of CONFIG; writes config.yaml, metrics.jsonl, tb/, adapter/ "
                                   "and eval.json to the output directory.")
    _add_config_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in the output directory")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="re-evaluate a finished run",
                       description="Reload RUN_DIR (config.yaml + adapter/) and evaluate it; prints JSON metrics.")
    p.add_argument("run_dir", type=Path, help="a directory written by `flatpeft train` / `compare`")
    p.add_argument("--data", type=Path, default=None,
                   help="evaluate on this file instead of the config's test split (same columns)")
    p.add_argument("--splits", default="test", help="comma list of test, train, val (default: test)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("compare", help="paired multi-method, multi-seed comparison with tables and a chart",
                       description="Train every method with every seed (seed-major), then write results.md, "
                                   "results.csv and results.png: mean ± std, paired difference to base with a "
                                   "95 % t confidence interval, time per step relative to base.")
    _add_config_args(p)
    p.add_argument("--methods", default="base,sam,flatpo,eflat-lora",
                   help="comma list of methods (default: base,sam,flatpo,eflat-lora); base is the reference")
    p.add_argument("--seeds", default="3", help="number of seeds (from train.seed) or a comma list (default: 3)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true", help="replace existing runs in the output directory")
    group.add_argument("--resume", action="store_true",
                       help="keep finished runs trained with the same settings, data and code; train the rest "
                            "(changed settings or data files are refused; runs of other code are retrained)")
    p.add_argument("--keep-other-code", action="store_true",
                   help="with --resume: keep finished runs trained by other code (the tables name the code of "
                        "every run) instead of retraining them")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("data", help="offline models and datasets",
                       description="Manage the offline assets (cache: $FLATPEFT_CACHE or ~/.cache/flatpeft).")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    data_sub.required = True
    q = data_sub.add_parser("prepare", help="install / convert the offline assets (idempotent)",
                            description="Prepare the offline assets (all by default).")
    q.add_argument("--only", default=None,
                   help="comma list of asset names (default: all datasets and models); 'multimodal' also builds the "
                        "cached pre-alignment checkpoints of clip_fewshot and vlm_instruct (built on first use otherwise)")
    q.add_argument("--force", action="store_true", help="redo finished assets")
    q.set_defaults(func=_cmd_data_prepare)
    q = data_sub.add_parser("verify", help="check the prepared assets against their recorded size and sha256",
                            description="Hash every prepared asset file and compare it with the manifest written "
                                        "at preparation; a mismatch names the file and `flatpeft data prepare --force`.")
    q.add_argument("--only", default=None, help="comma list of asset names (default: every prepared asset)")
    q.set_defaults(func=_cmd_data_verify)

    p = sub.add_parser("config", help="validate a config and print it resolved",
                       description="Read CONFIG, apply --set overrides, validate, print the full YAML.")
    _add_config_args(p)
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("methods", help="list the registered methods", description="List the registered methods.")
    p.add_argument("--markdown", action="store_true", help="print the full table (passes, defaults with sources, "
                   "what is perturbed and ranked, extra memory) as Markdown")
    p.set_defaults(func=_cmd_methods)
    p = sub.add_parser("tasks", help="list the registered tasks", description="List the registered tasks.")
    p.set_defaults(func=_cmd_tasks)
    p = sub.add_parser("configs", help="list the built-in configs (run them by name), or print one",
                       description="Without NAME: every built-in config (experiments, the suite plan, accelerate "
                                   "launch configs). With NAME: print it (copy it to edit: flatpeft configs "
                                   "finefoods_fewshot > my.yaml), or its path with --path (accelerate launch "
                                   "--config_file \"$(flatpeft configs accelerate/ddp --path)\" ...).")
    p.add_argument("name", nargs="?", default=None, help="a built-in config name, e.g. finefoods_fewshot")
    p.add_argument("--path", action="store_true", help="print the file's path instead of its text")
    p.set_defaults(func=_cmd_configs)
    p = sub.add_parser("docs", help="the Markdown docs shipped with the package",
                       description="Without PAGE: the directory of the docs and their page names. With PAGE (e.g. "
                                   "cli, methods): print that page.")
    p.add_argument("page", nargs="?", default=None, help="a page name, e.g. cli")
    p.set_defaults(func=_cmd_docs)

    problems = _register_plugins(sub)
    parser.set_defaults(_plugin_problems=problems)
    return parser


def _quiet_libraries() -> None:
    """Keep the terminal readable: transformers' load reports (e.g. the expected "classifier MISSING" of a
    fresh head) and warnings go to errors only; library users calling the Python API keep their settings."""
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flatpeft`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    for problem in getattr(args, "_plugin_problems", []):
        print(f"flatpeft: warning: sub-commands of {problem} are unavailable", file=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("flatpeft: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `flatpeft methods --markdown | head`: the reader left; not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python would otherwise complain again when flushing at exit
        return 141
    except ValueError as err:
        print(f"flatpeft: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # AssetMissingError names the asset and the command that installs it
        from flatpeft.assets import AssetMissingError

        if isinstance(err, AssetMissingError):
            print(f"flatpeft: error: {err}", file=sys.stderr)
            return 2
        return _environment_error(err)
    except Exception as err:  # noqa: BLE001 - file-system faults (disk full, read-only, name too long) get one line
        return _environment_error(err)


def _environment_error(err: Exception) -> int:
    """Print a file-system fault (an ``OSError``, or a library's wrapper of one) as one named line and return 2;
    re-raise anything else (a bug, which needs its traceback)."""
    from flatpeft.experiments.rundir import as_os_error, describe_os_error

    os_err = as_os_error(err)
    if os_err is None:
        raise err
    print(f"flatpeft: error: {describe_os_error(os_err)}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
