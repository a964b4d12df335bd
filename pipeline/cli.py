"""strata command line: fixtures, run, demo, verify."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import yaml

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "smollm2-135m-gptq-w4g64.yaml"


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def cmd_fixtures(args) -> int:
    from pipeline import fixtures

    for name, path in fixtures.fetch_all().items():
        if args.verify and path.is_dir():
            fixtures.verify_fixture(path)
        print(f"{name:16s} {path}")
    return 0


def cmd_run(args) -> int:
    from pipeline.config import load_config
    from pipeline.job import format_report, run_full_job

    overrides = _overrides(args.set)
    if args.workers:
        overrides["run.workers"] = args.workers
    if args.overwrite:
        overrides["output.overwrite"] = True
    if args.no_eval:
        overrides["eval"] = None
    cfg = load_config(args.config, overrides)
    report = run_full_job(cfg, progress=not args.quiet)
    print()
    print(format_report(report))
    return 0


def cmd_verify(args) -> int:
    from pipeline import fixtures
    from pipeline.assemble import ResultSource
    from pipeline.checkpoint import CheckpointReader
    from pipeline.config import parse_config
    from pipeline.run import load_records
    from pipeline.store import open_store
    from pipeline.verify import verify_gguf, verify_gptq

    store = open_store(args.store)
    run = store.get_json(f"runs/{args.run_id}/run.json")
    cfg = parse_config(run["config"], f"run {args.run_id}")
    reader = CheckpointReader(fixtures.resolve(cfg.model))
    results = ResultSource(store, load_records(store, f"runs/{args.run_id}", reader.num_layers))
    path = Path(args.artifact)
    summary = verify_gguf(path, reader, results)[0] if path.suffix == ".gguf" else verify_gptq(path, reader, results)
    print(summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="strata", description="Quantize large checkpoints block by block on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fixtures", help="fetch and cache the model and text fixtures")
    p.add_argument("--verify", action="store_true", help="check every cached file against its checksum")
    p.set_defaults(func=cmd_fixtures)

    for name, helptext in (("run", "run a job config"), ("demo", "run the embedded default job")):
        p = sub.add_parser(name, help=helptext)
        if name == "run":
            p.add_argument("config")
        else:
            p.set_defaults(config=str(DEMO_CONFIG))
        p.add_argument("--workers", type=int, help="number of worker actors (overrides run.workers)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
        p.add_argument("--overwrite", action="store_true", help="replace existing artifacts")
        p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.set_defaults(func=cmd_run)

    p = sub.add_parser("verify", help="verify an artifact against its run record")
    p.add_argument("artifact")
    p.add_argument("--run-id", required=True)
    p.add_argument("--store", default="runs")
    p.set_defaults(func=cmd_verify)

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("urllib3", "filelock", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from pipeline.assemble import AssembleError
    from pipeline.calibration import CalibrationError
    from pipeline.checkpoint import CheckpointError
    from pipeline.config import ConfigError
    from pipeline.fixtures import FixtureError
    from pipeline.verify import VerifyError

    try:
        return args.func(args)
    except (ConfigError, CheckpointError, CalibrationError, AssembleError, FixtureError, VerifyError) as err:
        print(f"strata: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
