"""Unbounded work or waiting before any output, refused up front: a sweep grid too large to mean, a model config
too deep (or zero-deep) to plan, and a Ray cluster that never answers the join. Each ends in one line, fast."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantlab.cli import cli
from quantlab.errors import RecipeError, UsageError
from quantlab.sweep.spec import load_spec
from tiny import build_llama_dir

HAS_RAY = __import__("importlib").util.find_spec("ray") is not None


def _write(path, text):
    path.write_text(text)
    return path


def _one_line_error(res, code: int) -> str:
    """The CLI's output: exactly one line, ``Error: ...``, and the exit code (a traceback fails here)."""
    assert res.exit_code == code, (res.output, res.exception)
    assert res.output.startswith("Error: ") and res.output.count("\n") == 1, res.output
    return res.output


# ---- sweep grids: counted before they are expanded ----------------------------------------------------------

def test_a_grid_of_a_million_jobs_is_refused_before_it_is_expanded(tmp_path):
    """100 x 100 x 100 GPTQ points: counted from the axes' lengths and refused in well under a second (expanding
    it took minutes), naming the count and the flag; nothing is written."""
    sweep = _write(tmp_path / "big.yaml", f"""
models: ["{tmp_path / 'no-model'}"]
recipes:
  - {{method: gptq, bits: 4, group_size: 64, seed: {list(range(100))}, samples: {list(range(1, 101))},
     tokens: {list(range(8, 108))}}}
""")
    started = time.perf_counter()
    res = CliRunner().invoke(cli, ["sweep", str(sweep), "--out", str(tmp_path / "out"), "--store",
                                   str(tmp_path / "s.db")])
    took = time.perf_counter() - started
    out = _one_line_error(res, 2)
    assert "1,000,000 jobs (1 model x 1,000,000 recipes), over the limit of 1,000" in out
    assert "trim the grid's lists, or pass --max-jobs 1000000" in out
    assert took < 3, took
    assert not (tmp_path / "out").exists() and not (tmp_path / "s.db").exists()


def test_many_models_times_recipes_count_as_jobs(tmp_path):
    """The count is models x recipes: 600 models x 2 recipes is 1,200 jobs, refused before any model resolves."""
    models = [str(tmp_path / f"m{i}") for i in range(600)]
    sweep = _write(tmp_path / "wide.yaml", f"models: {json.dumps(models)}\nrecipes: [fp, rtn-w8]\n")
    res = CliRunner().invoke(cli, ["sweep", str(sweep), "--out", str(tmp_path / "out")])
    assert "1,200 jobs (600 models x 2 recipes), over the limit of 1,000" in _one_line_error(res, 2)


def test_max_jobs_lets_a_counted_grid_through(tmp_path):
    """``--max-jobs`` (``max_jobs``) moves the limit: a 12-point grid is refused at 11 and expanded at 12; the CLI
    flag is checked like any option."""
    sweep = _write(tmp_path / "s.yaml",
                   "recipes:\n  - {method: rtn, bits: [4, 8], group_size: [16, 32, 64, 128, 256, 512]}\n")
    with pytest.raises(UsageError, match=r"12 jobs \(1 model x 12 recipes\), over the limit of 11 .* --max-jobs 12"):
        load_spec(sweep, max_jobs=11)
    assert len(load_spec(sweep, max_jobs=12).recipes) == 12
    res = CliRunner().invoke(cli, ["sweep", str(sweep), "--max-jobs", "0"])
    assert res.exit_code == 2 and "--max-jobs" in res.output


# ---- empty or wrongly typed sweep values -------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("models: []\nrecipes: [fp]\n", "'models' must be a non-empty list of model references"),  # ran the default
    ("models:\nrecipes: [fp]\n", "non-empty list of model references, e.g. [smollm2-135m] (got None)"),
    ("model: ''\nrecipes: [fp]\n", "'model' must be a model reference"),
    ("recipes: [{method: rtn, bits: []}]\n", "recipes[0]: 'bits' is an empty list, which makes no recipe"),
    ("recipes: [fp, {method: rtn, bits: 4, group_size: []}]\n", "'group_size' is an empty list"),
    ("recipes: [{method: fit, weights_budget: 1MiB, formats: []}]\n", "'formats' is an empty list"),
    ("recipes: [{method: gptq, calibration: [[self, c4_calibration]]}]\n",  # a TypeError (unhashable) before
     "calibration must be one value, not a list (got ['self', 'c4_calibration'])"),
    ("recipes: [{method: rtn, bits: {four: 4}}]\n", "bits must be one value, not a mapping"),
    ("recipes: [{method: rtn, group_size: 64.0}]\n", "group_size must be an integer (got 64.0)"),  # rtn-w4-g64.0
    ("recipes: [{method: gptq, samples: true}]\n", "samples must be an integer (got True)"),  # samples=1
    ("recipes: [{method: qat, lr: 1e-4}]\n", "lr must be a number (got '1e-4'; YAML reads 1e-4 as text"),
    ("recipes: [fp]\nthreads: true\n", "threads must be a positive integer (got True)"),
    ("recipes: [fp]\ntext: 5\n", "text must be a non-empty string (got 5)"),
])
def test_empty_or_wrongly_typed_sweep_values_are_named(tmp_path, text, message):
    with pytest.raises((UsageError, RecipeError)) as info:
        load_spec(_write(tmp_path / "s.yaml", text))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


# ---- model configs: shape fields checked before any module is built ------------------------------------------

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
         "max_position_embeddings": 512, "tie_word_embeddings": True}


def _config_dir(path: Path, **fields) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({**LLAMA, **fields}))
    return path


@pytest.mark.parametrize("fields, message", [
    ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer (got 0)"),  # ZeroDivisionError
    ({"num_hidden_layers": -1}, "num_hidden_layers must be a positive integer (got -1)"),
    ({"hidden_size": 0}, "hidden_size must be a positive integer (got 0)"),
    ({"intermediate_size": -5}, "intermediate_size must be a positive integer (got -5)"),  # negative dimension
    ({"vocab_size": 0}, "vocab_size must be a positive integer (got 0)"),  # planned a 0-word vocabulary
    ({"num_key_value_heads": 3}, "num_attention_heads (4) is not a multiple of num_key_value_heads (3)"),
])
def test_plan_names_a_bad_shape_field(tmp_path, fields, message):
    model = _config_dir(tmp_path / "m", **fields)
    out = _one_line_error(CliRunner().invoke(cli, ["plan", str(model)]), 1)
    assert f"Error: The config of {model}: {message}" in out


def test_plan_refuses_ten_million_layers_at_once(tmp_path):
    """10^7 layers built one by one on the meta device took hours; the count is refused before building."""
    model = _config_dir(tmp_path / "deep", num_hidden_layers=10**7)
    started = time.perf_counter()
    try:
        res = subprocess.run([sys.executable, "-m", "quantlab.cli", "plan", str(model)], capture_output=True,
                             text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("quantlab plan built 10^7 layers for a minute instead of refusing them")
    assert res.returncode == 1 and res.stdout == "", res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith(
        f"Error: The config of {model}: num_hidden_layers is 10,000,000, over the 1024 layers quantlab builds")
    assert time.perf_counter() - started < 60


@pytest.mark.parametrize("layers", [0, -1])
def test_fit_names_a_non_positive_layer_count(tmp_path, layers):
    """A saved model whose config says 0 (or -1) layers: ``fit`` said so with a scipy traceback from the
    allocation; now one line before any work, and no artifact is started."""
    model = build_llama_dir(tmp_path / "m", layers=0)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}))
    res = CliRunner().invoke(cli, ["fit", str(model), "--weights-budget", "1MiB"])
    out = _one_line_error(res, 1)
    assert f"num_hidden_layers must be a positive integer (got {layers})" in out
    home = Path(os.environ["QUANTLAB_HOME"])
    assert not (home / "artifacts").exists() and not (home / "sensitivity").exists() and not (home / "logits").exists()


# ---- Ray: a join that cannot succeed ends in one line --------------------------------------------------------

@pytest.fixture()
def tiny_sweep(tiny_dir, tiny_text, tmp_path):
    return _write(tmp_path / "tiny.yaml", f"""
models: ["{tiny_dir}"]
recipes: [rtn-w4-g32]
evaluation: {{text: "{tiny_text}", chunks: 4, chunk_tokens: 32}}
measure: {{batch_sizes: [1], repetitions: 1, decode_tokens: 2}}
""")


def _listener(host: str) -> socket.socket:
    """A TCP port on ``host`` that accepts and never speaks: nothing Ray can join. Closing it ends its thread."""
    sock = socket.socket()
    sock.bind((host, 0))
    sock.listen(16)
    held = []

    def accept():
        while True:
            try:
                held.append(sock.accept()[0])  # kept open: silent, not refused
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return sock


def _ray_target(address: str) -> str:
    from ray._private.services import canonicalize_bootstrap_address

    return canonicalize_bootstrap_address(address)


@pytest.mark.skipif(not HAS_RAY, reason="needs ray (setup installs it)")
def test_a_cluster_answering_on_loopback_only_is_named_where_ray_connects():
    """The issue's case: 127.0.0.1:PORT answers (a port forward, a container's port published on loopback), Ray
    rewrites it to this machine's interface address where nothing listens, and waited 9 minutes. Refused before
    any work, naming the address Ray tries and the fix."""
    from quantlab.sweep.executors import check_executor

    with _listener("127.0.0.1") as sock:
        address = f"127.0.0.1:{sock.getsockname()[1]}"
        target = _ray_target(address)
        if target == address:
            pytest.skip("this machine has no address but loopback: Ray does not rewrite it")
        with pytest.raises(UsageError) as info:
            check_executor("ray", address, timeout=2)
    message = str(info.value)
    assert f"Ray joins --address {address} at {target}" in message and "nothing answers" in message
    assert "pass the address the head advertises" in message and "\n" not in message


@pytest.mark.skipif(not HAS_RAY, reason="needs ray (setup installs it)")
def test_the_join_deadline_is_a_positive_number(monkeypatch):
    from quantlab.sweep.executors import check_executor

    for value in ("soon", "0", "-5", "nan"):
        monkeypatch.setenv("QUANTLAB_RAY_JOIN_TIMEOUT", value)
        with pytest.raises(UsageError, match=f"QUANTLAB_RAY_JOIN_TIMEOUT='{value}' is not a positive number"):
            check_executor("ray", "127.0.0.1:1")


@pytest.mark.skipif(not HAS_RAY, reason="needs ray (setup installs it)")
def test_a_join_that_never_answers_ends_at_the_deadline_in_one_line(tiny_sweep, tmp_path, quantlab_home):
    """Something answers TCP on every address but is no Ray cluster: Ray retried it for ~14 minutes printing GCS
    time-outs. With QUANTLAB_RAY_JOIN_TIMEOUT=2 the sweep ends about 2 s into the join, exit 2, and stderr is the
    one error line (Ray's own retries kept off it)."""
    with _listener("0.0.0.0") as sock:
        address = f"127.0.0.1:{sock.getsockname()[1]}"
        env = {**os.environ, "QUANTLAB_HOME": str(quantlab_home), "QUANTLAB_RAY_JOIN_TIMEOUT": "2"}
        cmd = [sys.executable, "-m", "quantlab.cli", "sweep", str(tiny_sweep), "--executor", "ray", "--address",
               address, "--out", str(tmp_path / "out"), "--store", str(tmp_path / "s.db")]
        try:
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("the sweep still waited on Ray after 2 minutes")
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.count("\n") == 1, res.stderr[-3000:]
    assert res.stderr.startswith(f"Error: Ray did not join the cluster at {address} (connecting to "
                                 f"{_ray_target(address)}) within 2 s")
    assert "QUANTLAB_RAY_JOIN_TIMEOUT" in res.stderr and not (tmp_path / "out").exists()


def _forward(port: int, to: int) -> socket.socket:
    """127.0.0.1:``port`` -> 127.0.0.1:``to``, as ``ssh -L`` or a container's loopback-published port would be."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(16)

    def pipe(a, b):
        with a, b:
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
                up = socket.create_connection(("127.0.0.1", to))
            except OSError:
                return
            threading.Thread(target=pipe, args=(conn, up), daemon=True).start()
            threading.Thread(target=pipe, args=(up, conn), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # a Ray head starts and a driver joins it
@pytest.mark.skipif(not HAS_RAY, reason="needs ray (setup installs it)")
def test_a_real_ray_head_is_joined_on_loopback_and_a_forwarded_one_is_named(tiny_sweep, tmp_path, quantlab_home):
    """A real head (``ray start --head``): ``--address 127.0.0.1:PORT`` is checked and joined (Ray connects to this
    machine's address, where the head listens too); the same head behind a loopback-only forward is refused at
    once, in one line, naming where Ray connects. The head is stopped by its process group (every process it
    started, and only those: ``ray stop`` would end every Ray process of this user), even when the test fails."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ql-ray-")  # short: Ray's socket paths must fit 107 characters
    ray_bin = Path(sys.executable).with_name("ray")
    # Ray 2.60 turns token authentication on for a head where ~/.ray/auth_token exists (any local ray.init() on the
    # machine writes one) and a driver joining an explicit address then sends none: off here, head and drivers alike
    env = {**os.environ, "QUANTLAB_HOME": str(quantlab_home), "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--port", str(port), "--num-cpus", "1",
                             "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert head.wait(timeout=120) == 0, head.stdout.read()[-3000:]
        with _forward(_free_port(), port) as fwd:
            address = f"127.0.0.1:{fwd.getsockname()[1]}"
            cmd = [sys.executable, "-m", "quantlab.cli", "sweep", str(tiny_sweep), "--executor", "ray", "--address",
                   address, "--out", str(tmp_path / "out")]
            started = time.perf_counter()
            try:
                res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
            except subprocess.TimeoutExpired:
                pytest.fail("the sweep still waited on Ray's rewritten address after 2 minutes")
        assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr[-3000:]
        assert f"Ray joins --address {address} at {_ray_target(address)}" in res.stderr
        assert time.perf_counter() - started < 60
        join = ("import ray\nfrom quantlab.sweep.executors import _join_ray, check_executor\n"
                f"check_executor('ray', '127.0.0.1:{port}')\n"
                f"_join_ray(ray, '127.0.0.1:{port}', {{'include_dashboard': False, 'log_to_driver': False}})\n"
                "print(ray.get(ray.remote(lambda: 41 + 1).remote()))\nray.shutdown()\n")
        res = subprocess.run([sys.executable, "-c", join], env=env, capture_output=True, text=True, timeout=180)
        assert res.returncode == 0 and res.stdout.strip() == "42", res.stderr[-3000:]
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(3)
        __import__("shutil").rmtree(temp, ignore_errors=True)
