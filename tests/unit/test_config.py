"""Settings: defaults, TOML file, BATCHSERVE_* environment, flags, and their precedence."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from batchserve.config import Settings, settings_from
from batchserve.errors import ConfigError


def test_defaults_serve_the_builtin_model_on_localhost_8080() -> None:
    s = settings_from([], environ={})
    assert (s.host, s.port, s.model) == ("127.0.0.1", 8080, "builtin")
    assert s.padded_batch_sizes() == [1, 2, 4, 8, 16, 32]


def test_precedence_is_flag_then_env_then_file_then_default(tmp_path: Path) -> None:
    toml = tmp_path / "batchserve.toml"
    toml.write_text('port = 9000\nmax_batch_size = 16\nmax_delay_ms = 2.5\nhost = "0.0.0.0"\n')
    env = {
        "BATCHSERVE_CONFIG": str(toml),
        "BATCHSERVE_MAX_BATCH_SIZE": "8",
        "BATCHSERVE_WARMUP": "false",
    }
    s = settings_from(["--port", "9100"], environ=env)
    assert s.port == 9100  # flag beats file
    assert s.max_batch_size == 8  # env beats file
    assert s.max_delay_ms == 2.5 and s.max_delay_s == 0.0025  # file beats default
    assert s.host == "0.0.0.0"
    assert s.warmup is False
    assert s.timeout_ms == Settings().timeout_ms  # default


def test_config_flag_and_batchserve_table(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("[batchserve]\nmax_queue = 7\naccess_log = true\n")
    s = settings_from(["--config", str(toml)], environ={})
    assert s.max_queue == 7 and s.access_log is True


def test_every_setting_is_read_from_its_env_name_and_its_flag() -> None:
    import dataclasses

    samples = {"bool": ("true", True), "int": ("3", 3), "float": ("3.5", 3.5), "str": ("x", "x")}
    special = {"batch_sizes": ("1,2", "1,2"), "metrics_address": ("127.0.0.1:9", "127.0.0.1:9")}
    for f in dataclasses.fields(Settings):
        raw, want = special.get(f.name) or samples[str(f.type)]
        if f.metadata.get("choices"):
            raw = want = f.metadata["choices"][-1]
        from_env = settings_from([], environ={"BATCHSERVE_" + f.name.upper(): raw})
        assert getattr(from_env, f.name) == want, f.name
        flag = "--" + f.name.replace("_", "-")
        argv = [flag] if want is True else [flag, raw]
        assert getattr(settings_from(argv, environ={}), f.name) == want, f.name


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--max-batch-size", "0"], {}, "max_batch_size must be at least 1"),
        (["--timeout-ms", "0"], {}, "timeout_ms must be positive"),
        (["--port", "70000"], {}, "port must be"),
        ([], {"BATCHSERVE_MAX_QUEUE": "many"}, "must be int"),
        ([], {"BATCHSERVE_WARMUP": "maybe"}, "true or false"),
        ([], {"BATCHSERVE_MAX_QEUE": "5"}, "unknown environment setting"),
        ([], {"BATCHSERVE_DEVICE": "tpu"}, "device must be one of"),
        (["--batch-sizes", "1,two"], {}, "batch_sizes must be integers"),
        (["--metrics-address", "9090"], {}, "metrics_address must be HOST:PORT"),
        ([], {"BATCHSERVE_METRICS_ADDRESS": "localhost:http"}, "metrics_address must be"),
    ],
)
def test_bad_values_are_refused_with_the_setting_named(
    argv: list[str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        settings_from(argv, environ=env)


def test_unknown_key_in_file_is_refused(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("max_batchsize = 4\n")
    with pytest.raises(ConfigError, match=r"unknown settings.*max_batchsize"):
        settings_from(["--config", str(toml)], environ={})


def test_explicit_batch_sizes_always_include_the_max() -> None:
    s = settings_from(["--batch-sizes", "1,8,4", "--max-batch-size", "12"], environ={})
    assert s.padded_batch_sizes() == [1, 4, 8, 12]


def test_help_answers_without_importing_tensorflow() -> None:
    code = (
        "import sys\n"
        "from batchserve.cli import main\n"
        "try:\n    main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n"
        "assert 'klein' not in sys.modules, 'klein imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--max-delay-ms" in done.stdout and "BATCHSERVE_" in done.stdout


def test_bad_setting_exits_2_with_a_message() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "batchserve.cli", "serve", "--max-queue", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "max_queue must be at least 1" in done.stderr


def test_decode_threads_default_to_half_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert settings_from([], environ={}).decode_thread_count() == 8
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert settings_from([], environ={}).decode_thread_count() == 1
    assert settings_from(["--decode-threads", "3"], environ={}).decode_thread_count() == 3


def test_serving_makes_idle_openmp_threads_sleep_unless_the_user_chose() -> None:
    from batchserve.cli import quiet_openmp

    environ: dict[str, str] = {}
    quiet_openmp(environ)
    assert environ == {"OMP_WAIT_POLICY": "PASSIVE"}
    environ = {"OMP_WAIT_POLICY": "ACTIVE"}
    quiet_openmp(environ)
    assert environ == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_metrics_address_splits_into_host_and_port() -> None:
    assert settings_from(["--metrics-address", "0.0.0.0:9090"]).metrics_host_port() == (
        "0.0.0.0",
        9090,
    )
    assert settings_from(["--metrics-address", "[::1]:0"]).metrics_host_port() == ("::1", 0)
