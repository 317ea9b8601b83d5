"""Failures a new user meets end in one clean line (a step process killed by SIGBUS), and stderr carries
quantlab's lines and real warnings, not library noise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from quantlab.errors import MeasurementError
from quantlab.steps.launcher import died, run_step


def test_a_step_killed_by_sigbus_is_reported_as_a_full_disk_with_quantlab_homes_free_space(tmp_path, monkeypatch,
                                                                                              quantlab_home):
    site = tmp_path / "site"
    site.mkdir()  # the step's interpreter runs this first: a real SIGBUS, as a mapped file on a full disk gives
    (site / "sitecustomize.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGBUS)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    with pytest.raises(MeasurementError) as err:
        run_step("bench", {})
    message = str(err.value)
    assert message.startswith("The bench subprocess was killed by SIGBUS — probably a full disk"), message
    assert f"QUANTLAB_HOME {quantlab_home} has " in message and " GB free" in message
    assert "out of memory" not in message and "\n" not in message


def test_other_deaths_name_the_signal_or_exit_code():
    assert "(killed by SIGKILL) — likely out of memory" in str(died("quantize", -9))
    assert "(exit code 3)" in str(died("quantize", 3))


NOISE = ("Failed to load", "_C_", "is an Enum subclass", "register_constant")


def test_the_cli_process_importing_torchao_leaves_stderr_free_of_its_import_noise(tiny_dir):
    pytest.importorskip("torchao")
    code = "import sys; from quantlab.cli import cli; sys.argv[0] = 'quantlab'; cli()"
    res = subprocess.run([sys.executable, "-c", code, "plan", str(tiny_dir), "--json"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert "torchao" in _imported_after(code, ["plan", str(tiny_dir), "--json"])  # the command does import torchao
    assert not [line for line in res.stderr.splitlines() if any(n in line for n in NOISE)], res.stderr


def _imported_after(code: str, args: list[str]) -> str:
    probe = code.replace("cli()", "cli(standalone_mode=False); print(' '.join(sys.modules), file=sys.stderr)")
    return subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=300).stderr


def test_only_the_noise_is_filtered_a_real_warning_of_the_same_loggers_still_shows():
    pytest.importorskip("torchao")
    code = ("import logging; from quantlab.quiet import filter_library_noise; filter_library_noise(); import torchao\n"
            "logging.getLogger('torchao').warning('torchao: a real problem')\n"
            "logging.getLogger('torch.utils._pytree').warning('pytree: a real problem')\n"
            "logging.getLogger('torchao').warning('Failed to load /x/torchao/_C_mxfp8.abi3.so: gone')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "torchao: a real problem" in res.stderr and "pytree: a real problem" in res.stderr
    assert not [line for line in res.stderr.splitlines() if any(n in line for n in NOISE)], res.stderr
