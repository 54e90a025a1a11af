"""README's "Command line" block is copy-pasteable (issue 35): every line parses with the CLI's own parser (fast),
and, marked ``real``, the whole block runs verbatim, top to bottom, in a fresh folder on the embedded SmolLM2.

The real test is the README block itself, not a copy: change the block and this test runs the change.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def readme_block(heading: str = "## Command line") -> list[str]:
    """The lines of the first ```bash block after ``heading`` in README.md."""
    text = (ROOT / "README.md").read_text()
    after = text[text.index(heading) :]
    m = re.search(r"```bash\n(.*?)```", after, re.S)
    assert m, f"no ```bash block after {heading!r} in README.md"
    return [line for line in m.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _argv(line: str) -> list[str]:
    """The arguments bash would pass, with each ``$(...)`` replaced by a placeholder path (comments dropped)."""
    words = shlex.split(re.sub(r"\$\([^)]*\)", "SUBSTITUTED_PATH", line), comments=True)
    assert words[0] == "rolora", f"README block line does not run rolora: {line!r}"
    return words[1:]


def test_every_readme_line_parses_with_the_cli_parser():
    """No shell metacharacters standing for optional arguments (``[--a|b]`` is a pipe in bash), every subcommand
    and flag exists: argparse exits 2 on anything else."""
    from rolora_plugin.app.cli import build_parser

    lines = readme_block()
    assert len(lines) >= 8
    for line in lines:
        code = line.split("#", 1)[0]
        assert not re.search(r"[|<>\[\]]", code.replace("$(", "(")), f"shell metacharacter in README block line: {line!r}"
        build_parser().parse_args(_argv(line))  # SystemExit(2) on an unknown subcommand or flag


def test_readme_block_reads_only_what_the_set_up_command_makes():
    """Outputs of the block never collide with the set-up command's demo folder (rolora-demo) nor with each other."""
    outs = [w for line in readme_block() for w in _argv(line)[1:] if not w.startswith("-")]
    assert "rolora-demo" not in outs


@pytest.mark.real
def test_readme_block_runs_verbatim(tmp_path):
    """Each line in order, through bash, in an empty folder that sees the repository's examples/ (the block is run
    from the repository root; its outputs land in the current folder). Per-line wall time is reported."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    times = []
    for line in readme_block():
        t0 = time.perf_counter()
        p = subprocess.run(["bash", "-euo", "pipefail", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
        times.append((round(time.perf_counter() - t0), line.split("#", 1)[0].strip()))
        print(f"{times[-1][0]:>5} s  exit {p.returncode}  {times[-1][1]}", flush=True)  # shown with -s
        assert p.returncode == 0, f"README line failed (exit {p.returncode}): {line}\n{p.stderr[-3000:]}"
        if line.startswith("rolora check"):
            assert "the consumer computes the exported model" in p.stdout, p.stdout
        if line.startswith("rolora rotate"):
            assert "exact" in p.stdout.lower() or "exact" in p.stderr.lower(), p.stdout + p.stderr
    for out in ("rot", "tuned/adapter", "tuned/merged", "merged", "w4a4", "demo-tiny"):
        assert (tmp_path / out).is_dir(), out
    assert (tmp_path / "w4a4" / "config.json").is_file() and (tmp_path / "demo-tiny" / "results.json").is_file()
