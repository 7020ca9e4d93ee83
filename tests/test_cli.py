"""The pyfff command line: --help, --version and config (other subcommands are tested beside their code)."""
import os
import subprocess
import sys
import sysconfig

import pyfff


def run(*args, cmd=(sys.executable, "-m", "pyfff")):
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)


def test_help():
    out = run("--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: pyfff")
    assert "config" in out.stdout and "--version" in out.stdout


def test_version():
    out = run("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == pyfff.__version__


def test_config():
    out = run("config")
    assert out.returncode == 0, out.stderr
    keys = {line.split(":")[0].strip() for line in out.stdout.splitlines()}
    assert {"pyfff", "openmp", "default_n_threads", "simd_variant", "blas"} <= keys
    assert pyfff.__version__ in out.stdout


def test_no_command_prints_help_and_fails():
    out = run()
    assert out.returncode == 2
    assert out.stdout.startswith("usage: pyfff")


def test_unknown_command():
    out = run("frobnicate")
    assert out.returncode == 2
    assert "invalid choice: 'frobnicate'" in out.stderr


def test_console_script():
    script = os.path.join(sysconfig.get_path("scripts"), "pyfff")
    assert os.path.exists(script), f"the pyfff console script is not installed at {script} (pip install -e .)"
    out = run("--version", cmd=(script,))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == pyfff.__version__


def test_config_help_describes_the_command():
    out = run("config", "--help")
    assert out.returncode == 0, out.stderr
    assert "int8 code paths" in out.stdout and "pyfff.show_config()" in out.stdout


def test_closed_stdout_is_not_a_traceback():
    """`pyfff info MODEL --json | head`: the reader leaves early; pyfff stops quietly with status 141."""
    read_end, write_end = os.pipe()
    os.close(read_end)                      # every write now fails with EPIPE
    model = os.path.join(os.path.dirname(__file__), "data", "ultrafastbert-tiny", "mlm")
    try:
        out = subprocess.run([sys.executable, "-m", "pyfff", "info", model, "--json"], stdout=write_end,
                             stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert out.returncode == 141
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr
