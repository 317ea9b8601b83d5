"""Failures a new user meets end in one clean line: a step process killed by SIGBUS."""

from __future__ import annotations

import os

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
