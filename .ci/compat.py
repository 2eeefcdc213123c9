"""`make compat`: the test suite against both ends of the declared torch/transformers ranges.

Developers and CI install from requirements.lock; users install from the ranges in
pyproject.toml. This script checks that those ranges are honest: for the oldest and the
newest release of transformers and of torch that the ranges allow (looked up on the package
index today), it makes a throwaway venv, installs that pair and the rest of our dependencies
as a user would (no lock), runs mypy --strict and the test suite, and prints a table.

    python .ci/compat.py [--keep] [--pytest-args "-x -q"] [--markdown FILE]

Exit status 1 if any corner fails. The core's and every plugin's ranges must agree.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PINNED = ("transformers", "torch")
PYPROJECTS = [ROOT / "pyproject.toml", *sorted(ROOT.glob("plugins/*/pyproject.toml"))]
PACKAGES = ["bridge_core", "adapters/bridge_adapters"] + [
    str(p.relative_to(ROOT)) for p in sorted(ROOT.glob("plugins/*/bridge_*")) if p.is_dir()
]


@dataclass
class Corner:
    """One combination of versions and what happened to it."""

    transformers: str
    torch: str
    install: str = "not run"
    mypy: str = "not run"
    tests: str = "not run"
    seconds: float = 0.0
    log: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.install == "ok" and self.mypy == "ok" and self.tests.startswith("passed")


def declared_ranges() -> dict[str, SpecifierSet]:
    """The torch and transformers ranges, which every pyproject must declare identically."""
    ranges: dict[str, tuple[SpecifierSet, Path]] = {}
    for path in PYPROJECTS:
        for line in tomllib.loads(path.read_text())["project"]["dependencies"]:
            req = Requirement(line)
            if req.name not in PINNED:
                continue
            seen = ranges.setdefault(req.name, (req.specifier, path))
            if seen[0] != req.specifier:
                sys.exit(
                    f"{path.relative_to(ROOT)} declares {req.name}{req.specifier}, but "
                    f"{seen[1].relative_to(ROOT)} declares {req.name}{seen[0]}: make them agree"
                )
    return {name: spec for name, (spec, _) in ranges.items()}


def editables() -> list[str]:
    """``-e`` arguments for our own distributions, with the extras requirements.in installs."""
    args: list[str] = []
    for line in (ROOT / "requirements.in").read_text().splitlines():
        if line.startswith("-e "):
            args += ["-e", str(ROOT / line.removeprefix("-e ").strip())]
    return args


def released(package: str, spec: SpecifierSet) -> list[Version]:
    """Final releases of `package` on the index that `spec` allows, oldest first."""
    out = _run([sys.executable, "-m", "pip", "index", "versions", package], env=_index_env())
    line = next(x for x in out.splitlines() if x.startswith("Available versions:"))
    versions = [Version(v.strip()) for v in line.split(":", 1)[1].split(",")]
    allowed = {
        v for v in versions if not (v.is_prerelease or v.is_devrelease or v.local) and v in spec
    }
    if not allowed:
        sys.exit(f"no release of {package} matches the declared range {spec}")
    return sorted(allowed)


def run_corner(corner: Corner, pytest_args: list[str], keep: bool) -> None:
    """Install one corner into a fresh venv and run mypy and the tests there."""
    start = time.monotonic()
    venv = Path(tempfile.mkdtemp(prefix=f"compat-tf{corner.transformers}-torch{corner.torch}-"))
    python = str(venv / "bin" / "python")
    env = {**_index_env(), "TRANSFORMER_BRIDGE_CACHE": str(venv / "tb-cache")}
    try:
        _run([sys.executable, "-m", "venv", str(venv)])
        pins = venv / "pins.txt"
        pins.write_text(f"transformers=={corner.transformers}\ntorch=={corner.torch}\n")
        install = [python, "-m", "pip", "install", "--quiet", "-c", str(pins)]
        install += ["torch", "transformers", *editables()]
        ok, out = _try(install, env)
        corner.install = "ok" if ok else "failed"
        corner.log.append(out)
        if not ok:
            return
        versions = _run([python, "-c", _VERSIONS])
        corner.log.append(versions)
        ok, out = _try([python, "-m", "mypy", "--strict", *PACKAGES], env, cwd=ROOT)
        corner.mypy = "ok" if ok else _last_line(out)
        corner.log.append(out)
        cmd = [python, "-m", "pytest", "-p", "no:cacheprovider", *pytest_args]
        ok, out = _try(cmd, env, cwd=ROOT)
        corner.tests = ("passed: " if ok else "FAILED: ") + _summary(out)
        corner.log.append(out)
    finally:
        corner.seconds = time.monotonic() - start
        if keep:
            print(f"  kept {venv}")
        else:
            shutil.rmtree(venv, ignore_errors=True)


_VERSIONS = (
    "import importlib.metadata as m; "
    "print(', '.join(f'{p} {m.version(p)}' for p in "
    "('torch', 'transformers', 'tokenizers', 'huggingface-hub', 'pydantic', 'pluggy')))"
)


def _index_env() -> dict[str, str]:
    """The environment for pip: this machine's pip settings, less any cap on torch.

    A machine's pip configuration can cap torch (a constraints file for its local wheels)
    and would hide the newest release the range allows, so pip reads no configuration file
    here: the corners install from the package index, as users do.
    """
    env = dict(os.environ)
    env["PIP_CONFIG_FILE"] = os.devnull
    env.pop("PIP_CONSTRAINT", None)
    env.pop("PIP_FIND_LINKS", None)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(cmd: list[str], env: dict[str, str] | None = None) -> str:
    ok, out = _try(cmd, env)
    if not ok:
        sys.exit(f"command failed: {' '.join(cmd)}\n{out}")
    return out


def _try(cmd: list[str], env: dict[str, str] | None, cwd: Path | None = None) -> tuple[bool, str]:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    return proc.returncode == 0, proc.stdout + proc.stderr


def _summary(pytest_output: str) -> str:
    """pytest's closing counts (``248 passed, 1 skipped``)."""
    counts = [x for x in pytest_output.splitlines() if re.search(r"\d+ (passed|failed|error)", x)]
    return re.sub(r"\s+in [\d.]+s.*|=", "", counts[-1]).strip() if counts else "no summary"


def _last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1][:120] if lines else "(no output)"


def table(corners: list[Corner], ranges: dict[str, SpecifierSet]) -> str:
    """The result as a Markdown table."""
    head = (
        f"Declared: torch{ranges['torch']}, transformers{ranges['transformers']} "
        f"(checked {time.strftime('%Y-%m-%d')}).\n\n"
        "| transformers | torch | install | mypy --strict | tests | time |\n"
        "| --- | --- | --- | --- | --- | --- |\n"
    )
    rows = [
        f"| {c.transformers} | {c.torch} | {c.install} | {c.mypy} | {c.tests} | "
        f"{c.seconds / 60:.1f} min |"
        for c in corners
    ]
    return head + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the venvs (for debugging)")
    parser.add_argument(
        "--pytest-args",
        default="",
        help="arguments for pytest (pyproject's addopts already has -q; -q again hides the counts)",
    )
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    parser.add_argument("--json", type=Path, help="write every corner's logs to this file")
    parser.add_argument(
        "--only",
        nargs=2,
        metavar=("TRANSFORMERS", "TORCH"),
        help="run this one pair instead of the four corners (for bisecting)",
    )
    args = parser.parse_args(argv)

    ranges = declared_ranges()
    if args.only:
        corners = [Corner(*args.only)]
    else:
        ends = {name: released(name, ranges[name]) for name in PINNED}
        pairs = itertools.product(
            dict.fromkeys((ends["transformers"][0], ends["transformers"][-1])),
            dict.fromkeys((ends["torch"][0], ends["torch"][-1])),
        )  # a range with one release has one end
        corners = [Corner(str(tf), str(pt)) for tf, pt in pairs]
    for corner in corners:
        print(f"== transformers {corner.transformers}, torch {corner.torch}", flush=True)
        run_corner(corner, args.pytest_args.split(), args.keep)
        print(f"   install {corner.install}; mypy {corner.mypy}; {corner.tests}", flush=True)
    result = table(corners, ranges)
    print("\n" + result)
    if args.markdown:
        args.markdown.write_text(result)
    if args.json:
        args.json.write_text(json.dumps([c.__dict__ for c in corners], indent=1))
    return 0 if all(c.ok for c in corners) else 1


if __name__ == "__main__":
    sys.exit(main())
