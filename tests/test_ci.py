""".ci/run fails the run at every step: the README's test command appears in it verbatim, and a
failed install or a failed test run inside that `a && b && c` line stops the script (under
`set -e` alone it would not: only the last command of an && list counts). The block is run
here with stub `pip` / `python` commands; nothing is installed."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CI = (ROOT / ".ci" / "run").read_text()


def readme_test_command() -> str:
    quickstart = (ROOT / "README.md").read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", quickstart, flags=re.S)
    assert len(blocks) == 2, "the quickstart has exactly two commands"
    command = blocks[1].strip()
    assert "\n" not in command and "pytest" in command
    return command


def ci_block() -> str:
    start = CI.index("# --- the README's test command")
    end = CI.index("# -------------------------------------------", start)
    return CI[start:end]


def test_readme_test_command_is_in_ci_verbatim():
    assert readme_test_command() in ci_block().splitlines()


STUB_PIP = {"install_fails": 'case "$*" in *"-e "*) exit 1;; esac; exit 0',
            "torch_fails": 'case "$*" in *torch*) exit 1;; esac; exit 0',
            "ok": "exit 0"}


@pytest.mark.parametrize("pip,python,stops", [
    ("install_fails", "exit 0", True),   # the package does not install, the tests (of an old build) would pass
    ("torch_fails", "exit 0", True),
    ("ok", "exit 1", True),              # the tests fail
    ("ok", "exit 0", False),
])
def test_a_failure_inside_the_readme_line_stops_the_script(tmp_path, pip, python, stops):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("pip", STUB_PIP[pip]), ("python", python)):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    helpers = "\n".join(line for line in CI.splitlines() if line.startswith(("t0=", "stamp()", "fail()")))
    script = f"set -euo pipefail\nexport PATH={bin_dir}:$PATH\n{helpers}\n{ci_block()}\necho REACHED\n"
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    if stops:
        assert proc.returncode != 0 and "REACHED" not in proc.stdout, (proc.stdout, proc.stderr)
        assert "FAILED: the README's test command" in proc.stderr
    else:
        assert proc.returncode == 0 and "REACHED" in proc.stdout, proc.stderr


def test_no_unchecked_and_list():
    """Every `a && b` line of .ci/run is the body of an `if ! ( ... ); then fail` check or a
    subshell whose status is checked."""
    lines = CI.splitlines()
    checked = False
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0] if not line.lstrip().startswith("#") else ""
        if text.startswith("if ! ("):
            checked = not text.rstrip().endswith("fi")
            if not checked:  # a one-line check: `if ! (a && b); then fail ...; fi`
                continue
        elif text.startswith(")"):
            checked = False
        elif "&&" in text:
            assert checked, f".ci/run line {number} chains commands with && outside a checked block: {line}"
