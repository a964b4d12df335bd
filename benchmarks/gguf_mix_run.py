"""llama.cpp's K mixes solved by strata's run, against llama.cpp's own files of each mix: without an importance
matrix, with the run's importance matrix, and with llama-imatrix's own.

strata: ``strata run`` with ``output.gguf_type`` the mix and method gptq (every decoder linear solved by GPTQ on the
type llama.cpp's mix gives it, the whole file as llama.cpp lays it out; pipeline/formats/gguf.py), calibrated on
64 evenly spaced 512-token windows of Emma (``--calibration``: another text, for strata and llama-imatrix alike).
llama.cpp: llama_model_quantize (the code of llama-quantize) from the model's GGUF; where llama.cpp's tools are
built (benchmarks/llamacpp_tools.sh), ``llama-quantize --imatrix`` with (a) the run's importance matrix
(pipeline/imatrix.py: mean x² per input over the run's calibration tokens) and (b) ``llama-imatrix``'s own,
computed on the source GGUF from the same windows (decoded to text, re-tokenized by llama.cpp into 512-token
chunks).

Every file is scored in llama.cpp (llama-cpp-python) by MEASURE.md: windows of 512 tokens of Persuasion and of the
King James Bible (off the calibration's domain), each from an empty context; Δppl, and KL divergence of the
next-token distribution (mean over positions), against the source GGUF (the reference weights; the fp16 fixture is
its dequantization). Files and scores (per file kind) are kept in --out; a second invocation reuses both and
scores only the kinds missing (delete to redo). Each Δppl, and each margin to the bar (Δppl − bar × the anchor's),
carries its standard error over the windows, paired by window (:func:`paired_gap`). ``--json`` writes the published
record (command, this invocation's commit, machine, each strata run's timings and checks from its job report, the
scores, every file's per-window NLL and KLD among them).

    python -m benchmarks.gguf_mix_run --mixes Q6_K,Q5_K_M,Q4_K_M,Q3_K_M,Q2_K --out /tmp/strata-mixes \\
        --eval-windows 8 --plot docs/gguf_mixes.png

``--own-mix`` (with ``--kept-statistics``) adds strata's own mix at each mix's size: the first mix's run also
records every linear's sensitivity on each type strata solves on (:data:`PROBE_TYPES`), ``strata plan --gguf-mix``
chooses each linear's type under the bytes llama.cpp's mix gives the linears, and that run is solved from the
kept statistics (:func:`own_mix_config`).

``--model qwen2.5-coder-1.5b`` makes the mixes of Qwen2.5-Coder-1.5B-Instruct (``strata fixtures --families``; its
source GGUF is llama.cpp's Q4_K_M, so mixes of 4 bits and more re-quantize onto the grid the weights came from) and
scores Persuasion and Python's standard library source (:data:`MODELS`).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import machine
from benchmarks.gguf_mix_file import TOOLS, llama_quantize

TEXTS = {"Persuasion": "fixture:austen/persuasion", "KJV": "fixture:kjv"}


@dataclass(frozen=True)
class Model:
    """A model the mixes are made of: its title, the texts scored (Persuasion and one off the calibration's domain:
    code for the code model) and where its source GGUF comes from (the scores' reference)."""

    title: str
    texts: dict[str, str]
    split: bool  # the source is one of pipeline.fixtures.SPLIT_GGUFS (else SmolLM2's own GGUF)


MODELS = {
    "smollm2-135m": Model("SmolLM2-135M", TEXTS, split=False),
    "qwen2.5-coder-1.5b": Model(
        "Qwen2.5-Coder-1.5B",
        {"Persuasion": "fixture:austen/persuasion", "Python stdlib": "fixture:code/python-stdlib"},
        split=True,
    ),
}


def source_gguf(model: str) -> Path:
    """The GGUF ``model``'s fixture is converted from: llama.cpp's input and every score's reference."""
    from strata_quant.pipeline import fixtures

    return fixtures._fetch_split_gguf(model) if MODELS[model].split else fixtures._fetch_smollm2_gguf()


KINDS = ("strata (run)", "llama.cpp", "llama.cpp + run's imatrix", "llama.cpp + llama-imatrix")
#: --own-mix: strata's own types at the mix's size (``strata plan --gguf-mix`` on the first mix's probe), solved
#: from the first mix's kept statistics; listed after strata's file of llama.cpp's mix
OWN = "strata (own mix)"
#: the types the first mix's run probes (quant.sensitivity_types): every type strata solves on
PROBE_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def peer_files(specs: list[str], mixes: list[str]) -> dict[str, dict[str, Path]]:
    """{mix: {label: file}} of ``--peer LABEL=PATTERN`` (a glob; ``{mix}`` is the mix as named, ``{mix_lower}`` in
    lower case): another tool's file of each mix (auto-round's, made in its own venv), scored beside the others.
    Every pattern must match exactly one file for every mix; ValueError before any work otherwise."""
    import glob

    out: dict[str, dict[str, Path]] = {m: {} for m in mixes}
    for spec in specs:
        label, sep, pattern = spec.partition("=")
        if not sep or not label or not pattern:
            raise ValueError(f"--peer {spec!r}: want LABEL=PATTERN")
        if label in KINDS or label == "reference":
            raise ValueError(f"--peer {spec!r}: {label!r} names one of strata's own files")
        for mix in mixes:
            found = sorted(glob.glob(pattern.format(mix=mix, mix_lower=mix.lower())))
            if len(found) != 1:
                raise ValueError(f"--peer {label}: {len(found)} files match {pattern!r} for {mix} (want one)")
            out[mix][label] = Path(found[0])
    return out


def kinds_of(row: dict) -> list[str]:
    """The kinds of a mix's files in table order: strata's and llama.cpp's (KINDS), then the peers' as given."""
    order = (KINDS[0], OWN, *KINDS[1:])
    return [k for k in order if k in row] + [k for k in row if k not in order and k != "reference"]


def mix_config(out: Path, mix: str, args):
    """The job of strata's file of ``mix`` of the fixture ``args.model`` (parsed, so a bad ``--quant`` override is
    refused here); ``args.quant_overrides``: the config's ``quant:`` keys, e.g. ``diag_shrink``."""
    from strata_quant.pipeline.config import parse_config

    calibration = {"source": args.calibration, "num_samples": args.cal_windows, "seq_len": args.seq_len}
    run = {"workers": args.workers, "store": str(out / "store")}
    quant = {"method": "gptq", "bits": 4, "group_size": 32, **(args.quant_overrides or {})}
    if getattr(args, "kept_statistics", False):  # one store; the first mix keeps, the others solve from it
        run["store"] = str(Path(args.out) / "store")
        if mix == args.mixes.split(",")[0]:
            run["keep_statistics"] = True
            if getattr(args, "own_mix", False):  # the probe every mix's own types are planned from
                quant["sensitivity_types"] = PROBE_TYPES
        else:
            calibration["statistics"] = getattr(args, "kept_run", None) or "the first mix's run"
    return parse_config(
        {
            "name": f"{args.model.replace('.', '')}-{mix}",
            "model": f"fixture:{args.model}",
            "calibration": calibration,
            "quant": quant,
            "run": run,
            "output": {"dir": str(out / "out"), "formats": ["gguf"], "gguf_type": mix, "overwrite": True},
            "eval": None,
        }
    )


def strata_run(out: Path, mix: str, args) -> tuple[Path, Path, float]:
    """The strata file of ``mix`` (a full job of :func:`mix_config`: plan, run, assemble, verify) and the run's
    importance matrix."""
    from strata_quant.pipeline.imatrix import write_imatrix
    from strata_quant.pipeline.job import run_full_job
    from strata_quant.pipeline.store import open_store

    cfg = mix_config(out, mix, args)
    t = time.perf_counter()
    report = run_full_job(cfg, progress=False)
    took = time.perf_counter() - t
    (check,) = report["checks"]
    print(f"strata run {mix}: {took:.0f} s; {check['bit_exact_linears']}/{check['quantized_linears']} linears "
          f"bit-exact, types {check['linear_types']}", flush=True)  # fmt: skip
    imatrix = write_imatrix(open_store(cfg.run.store), report["run_id"], out / "strata.imatrix.gguf")
    (out / "run-id").write_text(report["run_id"])
    return next((out / "out").glob("*.gguf")), imatrix, took


def own_mix_config(out: Path, mix: str, args) -> Path:
    """``strata plan --gguf-mix MIX`` on the first mix's run (the probe): the config of strata's own types at the
    byte size llama.cpp's ``mix`` gives the linears, solved from the probe's kept statistics, written to
    ``out / mix / own / own.yaml`` (its first line the plan's summary)."""
    from strata_quant.pipeline.plan import plan_own_mix
    from strata_quant.pipeline.store import open_store

    probe = (out / args.mixes.split(",")[0] / "run-id").read_text()
    candidates = own_candidates(args)
    d = out / mix / "own"
    name = f"{args.model.replace('.', '')}-{mix}-own"
    plan, path = plan_own_mix(
        open_store(str(out / "store")), probe, mix, d / "own.yaml", candidates=candidates, name=name
    )
    (d / "candidates.json").write_text(json.dumps(candidates))
    print(f"strata plan --gguf-mix {mix}: {plan.summary()}", flush=True)
    return path


def own_candidates(args) -> list[str] | None:
    """The types strata's own mix chooses from (``--own-candidates``; None: every type the probe recorded)."""
    given = getattr(args, "own_candidates", None)
    return given.split(",") if given else None


def own_mix_file(out: Path, mix: str, args) -> Path:
    """strata's own file of ``mix``: the one kept in ``out / mix / own`` when it was planned from the same candidate
    types (else refused: another --out), or a new run (:func:`own_mix_run`)."""
    d = out / mix / "own"
    kept = next((d / "out").glob("*.gguf"), None)
    if kept is None:
        return own_mix_run(out, mix, args)
    planned = json.loads((d / "candidates.json").read_text())
    if planned != own_candidates(args):
        raise SystemExit(f"--own-candidates: {d} holds a file planned from {planned}; give another --out")
    return kept


def own_mix_run(out: Path, mix: str, args) -> Path:
    """strata's file of its own types at ``mix``'s size (:func:`own_mix_config`, a full job)."""
    import yaml

    from strata_quant.pipeline.config import parse_config
    from strata_quant.pipeline.job import run_full_job

    d = out / mix / "own"
    data = yaml.safe_load(own_mix_config(out, mix, args).read_text())
    data["output"] |= {"dir": str(d / "out"), "overwrite": True}
    t = time.perf_counter()
    (check,) = run_full_job(parse_config(data), progress=False)["checks"]
    print(f"strata own mix at {mix}: {time.perf_counter() - t:.0f} s; {check['bit_exact_linears']}/"
          f"{check['quantized_linears']} linears bit-exact, types {check['linear_types']}", flush=True)  # fmt: skip
    return next((d / "out").glob("*.gguf"))


def llama_imatrix(src: Path, windows: torch.Tensor, tokenizer, out: Path, threads: int) -> Path:
    """llama-imatrix's importance matrix of ``src`` on the calibration ``windows`` (decoded to one text; llama.cpp
    re-tokenizes it and cuts chunks of the windows' length)."""
    path = out / "llama-imatrix.gguf"
    if path.exists():
        return path
    text = out / "calibration.txt"
    text.write_text("".join(tokenizer.decode(w) for w in windows.tolist()))
    n, t = windows.shape
    cmd = [str(TOOLS / "llama-imatrix"), "-m", str(src), "-f", str(text), "-o", str(path), "-c", str(t),
           "--chunks", str(n), "--no-ppl", "-t", str(threads)]  # fmt: skip
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    chunks = [line for line in done.stderr.splitlines() if "chunks" in line.lower()][:2]
    print(f"llama-imatrix: {'; '.join(chunks)}", flush=True)
    counted = re.search(r"computing over (\d+) chunks", done.stderr)
    if counted:  # llama.cpp re-tokenizes the windows' text: its chunks need not be the windows
        (out / "llama-imatrix.json").write_text(json.dumps({"chunks": int(counted.group(1))}))
    return path


def mix_files(out: Path, src: Path, mix: str, args, imatrix_llama: Path | None) -> dict[str, Path]:
    """The four files of one mix (made where missing, reused where an earlier invocation left them)."""
    d = out / mix
    strata = next((d / "out").glob("*.gguf"), None)
    run_imatrix = d / "strata.imatrix.gguf"
    if strata is None or not run_imatrix.exists():
        strata, run_imatrix, _ = strata_run(d, mix, args)
    files = {KINDS[0]: strata, KINDS[1]: d / f"llamacpp-{mix}.gguf"}
    if getattr(args, "own_mix", False):
        files[OWN] = own_mix_file(out, mix, args)
    if not files[KINDS[1]].exists():
        llama_quantize(src, files[KINDS[1]], mix)
    if (TOOLS / "llama-quantize").exists():
        run_im = run_imatrix if args.run_imatrix_at == "all" or mix in args.run_imatrix_at.split(",") else None
        for kind, im, name in ((KINDS[2], run_im, "run-imatrix"), (KINDS[3], imatrix_llama, "llama-imatrix")):
            if im is None:
                continue
            files[kind] = d / f"llamacpp-{name}-{mix}.gguf"
            if not files[kind].exists():
                llama_quantize(src, files[kind], mix, im)
    return files


def score(src: Path, files: dict[str, Path], windows: torch.Tensor, threads: int, label: str = "") -> dict[str, dict]:
    """{label: ppl, Δppl, KLD, top-1} of every file against ``src`` on ``windows``, each from an empty context; the
    models are loaded side by side so the reference's distribution is computed once per window. Each entry keeps
    its per-window mean NLL (``window_nll``; the files' also ``window_kld``), so any two files scored on the same
    windows, in this pass or another, compare paired (:func:`paired_gap`)."""
    t0 = time.perf_counter()
    from strata_quant.pipeline.verify import llamacpp_logits, load_llamacpp

    t = int(windows.shape[1])
    models = {"ref": load_llamacpp(src, n_ctx=t, n_threads=threads)}
    models.update({k: load_llamacpp(f, n_ctx=t, n_threads=threads) for k, f in files.items()})
    window_nll = {k: [] for k in models}
    window_kld = {k: [] for k in files}
    top1 = dict.fromkeys(files, 0)
    count = 0
    for window in windows.tolist():
        target = torch.tensor(window[1:]).unsqueeze(-1)
        ref = torch.log_softmax(llamacpp_logits(models["ref"], window)[:-1].double(), -1)
        window_nll["ref"].append(-float(ref.gather(-1, target).mean()))
        for k in files:
            logp = torch.log_softmax(llamacpp_logits(models[k], window)[:-1].double(), -1)
            window_nll[k].append(-float(logp.gather(-1, target).mean()))
            window_kld[k].append(float((ref.exp() * (ref - logp)).sum(-1).mean()))  # mean_t KL(p_ref,t ‖ p_t)
            top1[k] += int((logp.argmax(-1) == ref.argmax(-1)).sum())
        count += len(window) - 1
        done = count // (len(window) - 1)
        if done % 8 == 0:  # a 32-window pass takes tens of minutes on a loaded 2-core machine
            print(f"  {label}: {done}/{len(windows)} windows, {time.perf_counter() - t0:.0f} s", flush=True)
    del models
    # every window has the same length: the mean of the windows' means is the mean over tokens
    ppl_ref = math.exp(sum(window_nll["ref"]) / len(windows))
    out = {"reference": {"ppl": ppl_ref, "bytes": src.stat().st_size, "window_nll": window_nll["ref"]}}
    for k, f in files.items():
        ppl = math.exp(sum(window_nll[k]) / len(windows))
        out[k] = {"ppl": ppl, "dppl": (ppl - ppl_ref) / ppl_ref, "kld": sum(window_kld[k]) / len(windows),
                  "top1": top1[k] / count, "bytes": f.stat().st_size, "window_nll": window_nll[k],
                  "window_kld": window_kld[k]}  # fmt: skip
    return out


def paired_gap(per: dict, a: str, b: str = "reference", scale: float = 1.0) -> tuple[float, float | None]:
    """Δppl_a − scale · Δppl_b for two files scored on the same windows (``b`` the reference: ``a``'s Δppl; scale the
    bar: the margin by which ``a`` meets it), and its standard error over the windows, or None where a side has no
    per-window NLLs (scores saved before they were kept).

    With W windows of equal length and n_x,w a file's mean NLL on window w, Δppl_x = exp(mean_w (n_x,w − n_ref,w))
    − 1; by the delta method the gap's SE is sd(g) / √W over the windows' paired terms g_w = ppl_a / ppl_ref ·
    (n_a,w − n_ref,w) − scale · ppl_b / ppl_ref · (n_b,w − n_ref,w), so what a window's text costs every file
    cancels. Tokens within a window are correlated; the window is the unit drawn independently (evenly spaced)."""
    gap = per[a]["dppl"] - scale * (0.0 if b == "reference" else per[b]["dppl"])
    na, nb, nr = (per.get(k, {}).get("window_nll") for k in (a, b, "reference"))
    if not na or not nb or not nr or not len(na) == len(nb) == len(nr) or len(na) < 2:
        return gap, None
    na, nb, nr = (torch.tensor(x, dtype=torch.float64) for x in (na, nb, nr))
    ppl_ref = per["reference"]["ppl"]
    g = per[a]["ppl"] / ppl_ref * (na - nr)
    if b != "reference":
        g = g - scale * per[b]["ppl"] / ppl_ref * (nb - nr)
    return gap, float(g.std()) / math.sqrt(len(g))


def merge_scores(old: dict | None, new: dict) -> dict:
    """``new``'s kinds added to ``old``'s scores of the same windows; the reference's perplexity, computed again by
    each pass, must agree (the same source file and windows), else the saved scores are of other windows."""
    if not old:
        return new
    a, b = old["reference"]["ppl"], new["reference"]["ppl"]
    if abs(a - b) > 1e-6 * a:
        raise ValueError(f"reference ppl {b} differs from the saved {a}: the saved scores are of other windows")
    # the reference's per-window NLLs, where the saved scores predate them, come from this pass
    return {
        **old,
        **{k: v for k, v in new.items() if k != "reference"},
        "reference": {**new["reference"], **old["reference"]},
    }


def target(mix: str) -> float:
    """The issue's bar: strata's Δppl at most this times llama.cpp's with an importance matrix."""
    return 0.7 if mix in ("Q3_K_M", "Q2_K") else 0.75


def bar_scale(mix: str, anchor_dppl: float) -> float:
    """The bar as a margin: a file meets it where Δppl − this × the anchor's Δppl ≤ 0. A file below the reference
    (Δppl < 0) beats any anchor above it; against an anchor at or below the reference, strata's Δppl must be no
    higher than the anchor's (the ratio's sign alone decides nothing)."""
    return target(mix) if anchor_dppl > 0 else 1.0


def paired_kld(per: dict, a: str, b: str) -> tuple[float, float | None]:
    """KLD_a − KLD_b for two files scored on the same windows and its standard error over the windows (the
    mean of the windows' paired differences; KLD is a mean over positions, so no delta method), or None where a
    side has no per-window KLDs."""
    gap = per[a]["kld"] - per[b]["kld"]
    ka, kb = per[a].get("window_kld"), per[b].get("window_kld")
    if not ka or not kb or len(ka) != len(kb) or len(ka) < 2:
        return gap, None
    d = torch.tensor(ka, dtype=torch.float64) - torch.tensor(kb, dtype=torch.float64)
    return gap, float(d.std()) / math.sqrt(len(d))


def record(
    args, out: Path, src: Path, mixes: list[str], scores: dict, chunks: int | None, peers: dict | None = None
) -> dict:
    """The published result of an invocation: its command, commit and machine, what the files were made with (the
    folder's stamps), each strata run's timings and checks (from its job report in ``out``), the mixes' scores and
    the peers' files scored beside (``peers``: :func:`peer_files`), each with its sha256."""
    import sys

    from strata_quant.pipeline.fixtures import file_sha256

    runs = {}
    for mix in mixes:
        report = json.loads(next((out / mix / "out").glob("*-report.json")).read_text())
        (check,) = report["checks"]
        keep = ("linear_types", "bit_exact_linears", "quantized_linears")
        gguf = next((out / mix / "out").glob("*.gguf"))
        runs[mix] = {"timings": report["timings"], **{k: check[k] for k in keep}, "file_sha256": file_sha256(gguf)}
        own = out / mix / "own"
        if (own / "own.yaml").exists():  # --own-mix: the plan (its summary line) and the run of strata's own types
            report = json.loads(next((own / "out").glob("*-report.json")).read_text())
            (check,) = report["checks"]
            runs[mix]["own_mix"] = {
                "plan": (own / "own.yaml").read_text().splitlines()[0].lstrip("# "),
                "candidates": json.loads((own / "candidates.json").read_text()),
                "timings": report["timings"],
                **{k: check[k] for k in keep},
                "file_sha256": file_sha256(next((own / "out").glob("*.gguf"))),
            }
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {
        "model": f"fixture:{args.model}",
        "source_gguf_sha256": file_sha256(src),
        "command": "python -m benchmarks.gguf_mix_run " + " ".join(sys.argv[1:]),
        "commit": commit,
        "machine": machine(),
        "quant": args.quant_overrides or {},
        "calibration": {
            "text": args.calibration,
            "windows": args.cal_windows,
            "seq_len": args.seq_len,
            "llama_imatrix_chunks": chunks,
        },  # fmt: skip
        "eval_windows": args.eval_windows,
        "statistics_kept_by": mixes[0]
        if getattr(args, "kept_statistics", False)
        else None,  # the others solved from its statistics
        "strata_runs": runs,
        "scores": {k: v for k, v in scores.items() if k.split("/")[0] in mixes and k.endswith(f"/{args.eval_windows}")},
        **(
            {
                "peer_files": {
                    m: {k: {"path": str(f), "sha256": file_sha256(f)} for k, f in peers[m].items()} for m in mixes
                }
            }
            if any((peers or {}).values())
            else {}
        ),  # fmt: skip
    }


def tensor_bytes(path: Path) -> int:
    """Bytes of the file's tensor data (gguf-py's n_bytes summed): the size without metadata and alignment."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(path).tensors)


def table(
    scores: dict,
    mixes: list[str],
    windows: int,
    tensors: dict[str, dict[str, int]] | None = None,
    sizes: dict[str, dict[str, int]] | None = None,
    texts: dict[str, str] = TEXTS,
) -> list[str]:
    """The markdown table of every file, then one verdict line per mix (``tensors``: {mix: {kind: tensor data
    bytes}}, said beside the file sizes where given; ``sizes``: {mix: {kind: file bytes}} of every file made, a
    file not scored at ``windows`` listed with its size and no score; ``texts``: the model's, as MODELS names)."""
    head = "| mix | file | bytes | " + " | ".join(f"{t} Δppl | {t} KLD" for t in texts) + " |"
    lines = [head, "|" + "---|" * (3 + 2 * len(texts))]
    verdicts = []
    for mix in mixes:
        per = {t: scores[f"{mix}/{t}/{windows}"] for t in texts}
        size_of = (sizes or {}).get(mix) or {k: v["bytes"] for k, v in per["Persuasion"].items() if k != "reference"}
        for kind in kinds_of(size_of):
            if all(kind in per[t] for t in texts):
                cells = " | ".join(f"{_dppl_cell(per[t], kind)} | {per[t][kind]['kld']:.4f}" for t in texts)
            else:
                cells = " | ".join("not scored | —" for _ in texts)
            lines.append(f"| {mix} | {kind} | {size_of[kind]:,} | {cells} |")
        scored = [k for k in kinds_of(size_of) if all(k in per[t] for t in texts)]
        # strata's files, then each peer's (another solver of strata's, or another tool) against the same bar
        judged = [(KINDS[0], mix, "strata"), (OWN, f"{mix} (own mix)", "strata")]
        judged += [(k, f"{mix} ({k})", k) for k in scored if k not in KINDS and k != OWN]
        for kind, who, maker in judged:
            if kind in scored:
                verdicts.append(_verdict(who, mix, kind, per, size_of, (tensors or {}).get(mix), texts, maker))
        pairs = [(KINDS[0], KINDS[3])] + [(k, KINDS[0]) for k in scored if k not in KINDS]
        verdicts += [_paired_line(mix, a, b, per, texts) for a, b in pairs if a in scored and b in scored]
    return lines + [""] + [v for v in verdicts if v]


def _dppl_cell(per: dict, kind: str) -> str:
    """Δppl in percent, ± its paired standard error over the windows where they were kept."""
    gap, se = paired_gap(per, kind)
    return f"{100 * gap:+.2f} %" + ("" if se is None else f" ± {100 * se:.2f}")


def _paired_line(mix: str, a: str, b: str, per: dict, texts) -> str:
    """``a`` − ``b`` in Δppl (points) and KLD on each text with their SEs over the windows, paired by window; empty
    where the scores kept no per-window values."""
    dppl = [paired_gap(per[t], a, b) for t in texts]
    kld = [paired_kld(per[t], a, b) for t in texts]
    if any(e is None for _, e in dppl + kld):
        return ""
    cell = " / ".join(f"{100 * g:+.2f} ± {100 * e:.2f}" for g, e in dppl)
    return f"- {mix}: {a} − {b}, paired: Δppl {cell} points; KLD " + " / ".join(f"{g:+.4f} ± {e:.4f}" for g, e in kld)


def _verdict(
    who: str, mix: str, kind: str, per: dict, size_of: dict, tensors: dict | None, texts, maker: str = "strata"
) -> str:
    """One verdict line: ``maker``'s file ``kind`` of ``mix`` against llama.cpp's imatrix files and in size."""
    parts = []
    for anchor in (KINDS[3], KINDS[2]):
        if all(anchor in per[t] for t in texts):
            r = {t: per[t][kind]["dppl"] / per[t][anchor]["dppl"] for t in texts}
            margins = [paired_gap(per[t], kind, anchor, bar_scale(mix, per[t][anchor]["dppl"])) for t in texts]
            met = all(g <= 0 for g, _ in margins)
            ratios = " / ".join(f"{v:.2f}×" for v in r.values())
            paired = (
                "; margin "
                + " / ".join(f"{100 * g:+.2f} ± {100 * e:.2f}" for g, e in margins)
                + " points, SE over windows"
                if all(e is not None for _, e in margins)
                else ""
            )
            parts.append(f"vs {anchor}: {ratios} ({'met' if met else 'NOT met'}, bar {target(mix)}×{paired})")
    # llama.cpp's file of the mix; in a record that did not score it, its imatrix file (the same types)
    ref = next((k for k in (KINDS[1], KINDS[3], KINDS[2]) if k in size_of), None)
    line = f"- {who}: {maker} Δppl {' / '.join(texts)} " + "; ".join(parts)
    if ref is not None:
        size = size_of[kind] - size_of[ref]
        name = "llama.cpp's" if ref == KINDS[1] else f"{ref}'s"
        line += f"; size {'≤' if size <= 0 else '>'} {name} ({size:+,} bytes)"
    if tensors and kind in tensors:
        data = tensors[kind] - tensors[KINDS[1]]
        line += f", tensor data {'≤' if data <= 0 else '>'} llama.cpp's ({data:+,} bytes)"
    return line


def plot(scores: dict, mixes: list[str], windows: int, path: Path, model: str = "smollm2-135m") -> None:
    """Δppl against file size, one panel per text, one line per maker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MODELS[model].texts), figsize=(11, 4.2))
    kinds = kinds_of(dict.fromkeys(k for m in mixes for t in MODELS[model].texts for k in scores[f"{m}/{t}/{windows}"]))
    for ax, t in zip(axes, MODELS[model].texts, strict=True):
        for kind, marker in zip(kinds, "o^sDvP*X", strict=False):
            pts = [scores[f"{m}/{t}/{windows}"].get(kind) for m in mixes]
            pts = sorted((p["bytes"] / 1e6, 100 * p["dppl"], m) for p, m in zip(pts, mixes, strict=True) if p)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=kind)
        for m in mixes:
            p = scores[f"{m}/{t}/{windows}"][KINDS[0]]
            ax.annotate(m, (p["bytes"] / 1e6, 100 * p["dppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_yscale("symlog", linthresh=1.0)  # a file can score below the source (Δppl < 0)
        ax.axhline(0.0, color="0.5", lw=0.8)
        ax.set_xlabel("file size (MB)")
        ax.set_ylabel("Δppl vs the source GGUF (%; linear within ±1 %)")
        ax.set_title(f"{MODELS[model].title}, {t}, {windows} × 512 tokens")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", choices=list(MODELS), help="the fixture the mixes are made of")
    ap.add_argument("--mixes", default="Q6_K,Q5_K_M,Q4_K_M,Q3_K_M,Q2_K")
    ap.add_argument("--cal-windows", type=int, default=64)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default="/tmp/strata-mixes")
    ap.add_argument("--plot", help="write the size–Δppl plot (PNG) here")
    ap.add_argument("--json", help="write the result (command, commit, machine, runs, scores) here")
    ap.add_argument(
        "--run-imatrix-at",
        default="all",
        help="mixes (comma-separated, or all) also quantized by llama.cpp with the run's imatrix (a file each to score)",
    )
    ap.add_argument(
        "--calibration",
        default="fixture:austen/emma",
        help="the text strata's run and llama-imatrix both calibrate on (a calibration.source; needs an --out of its "
        "own, as the files kept there are of one calibration)",
    )
    ap.add_argument(
        "--score",
        default="all",
        help="the kinds scored, comma-separated indices into KINDS (0 strata, 1 llama.cpp, 2 + run's imatrix, "
        "3 + llama-imatrix) or all; every file is still made and its size listed",
    )
    ap.add_argument(
        "--kept-statistics",
        action="store_true",
        help="the first of --mixes keeps its statistics (run.keep_statistics) and every other mix is solved from "
        "them (calibration.statistics: no calibration forward of its own); needs an --out of its own",
    )
    ap.add_argument(
        "--own-mix",
        action="store_true",
        help="with --kept-statistics: the first mix's run also probes every linear on llama.cpp's types "
        "(quant.sensitivity_types), and each mix gets a file of strata's own types at its size (strata plan "
        "--gguf-mix), solved from the kept statistics and scored beside",
    )
    ap.add_argument(
        "--own-candidates",
        help="the types strata's own mix chooses from, comma-separated (default: every type the probe recorded); "
        "leave out the grids that hold the source's own blocks exactly (a fixture dequantized from Q4_1 is "
        "stored losslessly as Q4_1 or Q5_1, and nearly so as Q4_K or Q5_K)",
    )
    ap.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="LABEL=PATTERN",
        help="another tool's file of each mix, scored beside (repeatable): a glob with {mix} or {mix_lower}, e.g. "
        "'auto-round (iters 0)=/tmp/ar/gguf:{mix_lower}/*.gguf' (benchmarks/peers_autoround.py's --out)",
    )
    ap.add_argument(
        "--quant",
        action="append",
        help="strata's solver: KEY=VALUE of the config's quant: section (repeatable; needs an --out of its own, "
        "as the files and scores kept there are of one solver)",
    )
    args = ap.parse_args()
    if args.own_mix and not args.kept_statistics:
        ap.error("--own-mix plans every mix from the first mix's probe and solves it from its kept statistics: "
                 "give --kept-statistics")  # fmt: skip
    from benchmarks.peers import parse_quant

    args.quant_overrides = parse_quant(args.quant)
    from strata_quant.pipeline.config import ConfigError

    try:  # refused before any work: the jobs' own configs, parsed with the overrides and the calibration
        for mix in args.mixes.split(","):
            mix_config(Path(args.out), mix, args)
    except ConfigError as err:
        ap.error(f"--quant/--calibration: {err}")
    try:
        peers = peer_files(args.peer, args.mixes.split(","))
    except ValueError as err:
        ap.error(str(err))
    # what the files kept in --out were made with (written there below): a folder of another recipe is refused
    stamps = {
        "quant.json": ("quant", "of the solver", args.quant_overrides or {}),
        "calibration.json": ("calibration", "calibrated on", {"source": args.calibration}),
        "kept.json": ("kept-statistics", "made with kept statistics", {"kept": args.kept_statistics}),
    }
    for name, (flag, what, value) in stamps.items():
        stamp = Path(args.out) / name
        if stamp.exists() and json.loads(stamp.read_text()) != value:
            ap.error(f"--{flag}: {args.out} holds files {what} {stamp.read_text()}; give another --out")
    if args.quant_overrides:
        print(f"# strata's solver with quant overrides {args.quant_overrides}")
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from strata_quant.pipeline import fixtures
    from strata_quant.pipeline.calibration import (
        calibration_prefix,
        calibration_windows,
        eval_windows,
        load_text,
        tokenize_stream,
    )

    out, mixes, w = Path(args.out), args.mixes.split(","), args.eval_windows
    out.mkdir(parents=True, exist_ok=True)
    for name, (_, _, value) in stamps.items():
        (out / name).write_text(json.dumps(value))
    texts = MODELS[args.model].texts
    src = source_gguf(args.model)
    tok = AutoTokenizer.from_pretrained(fixtures.resolve(f"fixture:{args.model}"))
    held = {k: eval_windows(tokenize_stream(tok, load_text(v)), w, args.seq_len) for k, v in texts.items()}
    print(machine())
    print(f"{MODELS[args.model].title} {mixes}; calibration {args.cal_windows}×{args.seq_len} {args.calibration}, eval {w}×{args.seq_len} per "
          f"text in llama.cpp, {args.threads} threads")  # fmt: skip
    imatrix_llama = None
    if (TOOLS / "llama-imatrix").exists():
        cal = calibration_windows(tokenize_stream(tok, load_text(args.calibration)), args.cal_windows,
                                  args.seq_len, "even", prefix=calibration_prefix(tok))  # fmt: skip
        imatrix_llama = llama_imatrix(src, cal, tok, out, args.threads)
    saved = out / "scores.json"
    scores = json.loads(saved.read_text()) if saved.exists() else {}
    chosen = KINDS if args.score == "all" else tuple(KINDS[int(i)] for i in args.score.split(","))
    chosen += (OWN,) if args.own_mix else ()
    for mix in mixes:
        if args.kept_statistics and mix != mixes[0]:
            args.kept_run = (out / mixes[0] / "run-id").read_text()
        files = {k: f for k, f in mix_files(out, src, mix, args, imatrix_llama).items() if k in chosen} | peers[mix]
        for t, windows in held.items():
            key = f"{mix}/{t}/{w}"
            # only the kinds not yet scored: a pass cut off, or a kind added later, keeps the scores saved before
            todo = {k: f for k, f in files.items() if k not in scores.get(key, {})}
            if todo:
                t0 = time.perf_counter()
                scores[key] = merge_scores(scores.get(key), score(src, todo, windows, args.threads, key))
                saved.write_text(json.dumps(scores, indent=1))
                print(f"scored {key} ({', '.join(todo)}) in {time.perf_counter() - t0:.0f} s", flush=True)
    ref = {t: scores[f"{mixes[0]}/{t}/{w}"]["reference"]["ppl"] for t in texts}
    print(
        f"source GGUF {src.stat().st_size:,} bytes; reference ppl " + ", ".join(f"{t} {v:.3f}" for t, v in ref.items())
    )
    made = {m: mix_files(out, src, m, args, imatrix_llama) | peers[m] for m in mixes}
    tensors = {m: {k: tensor_bytes(f) for k, f in made[m].items()} for m in mixes}
    sizes = {m: {k: f.stat().st_size for k, f in made[m].items()} for m in mixes}
    print("\n".join(table(scores, mixes, w, tensors, sizes, texts)))
    if args.plot:
        plot(scores, mixes, w, Path(args.plot), args.model)
    if args.json:
        counted = out / "llama-imatrix.json"
        chunks = json.loads(counted.read_text())["chunks"] if counted.exists() else None
        result = record(args, out, src, mixes, scores, chunks, peers)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"result: {args.json}")


if __name__ == "__main__":
    main()
