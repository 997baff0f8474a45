"""Settings: one tree of the components' own dataclasses; defaults, TOML file,
BATCHSERVE_* environment, flags, their precedence, and what each command shows."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from batchserve.config import (
    BulkSettings,
    ServerSettings,
    ServeSettings,
    add_arguments,
    chosen_settings_table,
    leaves,
    load,
    parse,
    render_readme,
    render_settings_page,
    settings_page,
    settings_table,
)
from batchserve.errors import ConfigError
from batchserve.http.bodies import RequestLimits
from batchserve.serving.batching import BatchPolicy
from batchserve.settings import setting
from batchserve.storage.data_dir import StoreSettings
from batchserve.train.settings import TrainSettings


def serve(argv: list[str], environ: dict[str, str] | None = None) -> ServeSettings:
    return parse(ServeSettings, argv, {} if environ is None else environ)


def test_defaults_serve_the_builtin_model_on_localhost_8080() -> None:
    s = serve([])
    assert (s.server.host, s.server.port, s.model.source) == ("127.0.0.1", 8080, "builtin")
    assert s.batching.padded_batch_sizes() == [1, 2, 4, 8, 16, 32]
    assert s == ServeSettings()  # the defaults are the components' own


def test_precedence_is_flag_then_env_then_file_then_default(tmp_path: Path) -> None:
    toml = tmp_path / "batchserve.toml"
    toml.write_text('port = 9000\nmax_batch_size = 16\nmax_delay_s = 0.0025\nhost = "0.0.0.0"\n')
    env = {
        "BATCHSERVE_CONFIG": str(toml),
        "BATCHSERVE_MAX_BATCH_SIZE": "8",
        "BATCHSERVE_WARMUP": "false",
    }
    s = serve(["--port", "9100"], env)
    assert s.server.port == 9100  # flag beats file
    assert s.batching.max_batch_size == 8  # env beats file
    assert s.batching.max_delay_s == 0.0025  # file beats default
    assert s.server.host == "0.0.0.0"
    assert s.server.warmup is False
    assert s.batching.timeout_s == ServeSettings().batching.timeout_s == 10.0  # default


def test_config_flag_and_batchserve_table(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("[batchserve]\nmax_queue = 7\naccess_log = false\n")
    s = serve(["--config", str(toml)])
    assert s.batching.max_queue == 7 and s.server.access_log is False


def test_every_setting_lands_in_its_component_from_its_env_name_and_its_flag() -> None:
    samples = {bool: ("true", True), int: ("3", 3), float: ("3.5", 3.5), str: ("x", "x")}
    url = "postgresql://batchserve@127.0.0.1:5432/items"
    special = {
        "batch_sizes": ("1,2", "1,2"),
        "metrics_address": ("127.0.0.1:9", "127.0.0.1:9"),
        "catalog": (url, url),
        "forwarded_allow_ips": ("10.0.0.0/8", "10.0.0.0/8"),
        "workers": ("3", "3"),
    }
    for leaf in leaves(ServeSettings):
        raw, want = special.get(leaf.name) or samples[leaf.kind]
        if leaf.meta.choices:
            raw = want = leaf.meta.choices[-1]

        def value(s: ServeSettings, path: tuple[str, ...] = leaf.path) -> object:
            return getattr(getattr(s, path[0]), path[1])

        assert value(serve([], {"BATCHSERVE_" + leaf.name.upper(): raw})) == want, leaf.name
        flag = "--" + leaf.name.replace("_", "-")
        assert value(serve([flag] if want is True else [flag, raw])) == want, leaf.name


def test_every_flat_name_is_unique_and_durations_are_in_seconds() -> None:
    for root in (ServeSettings, BulkSettings, TrainSettings):
        names = [leaf.name for leaf in leaves(root)]
        assert len(names) == len(set(names)), root
        assert not [n for n in names if n.endswith("_ms")]


def test_each_command_shows_only_the_settings_it_uses() -> None:
    index = {leaf.name for leaf in leaves(BulkSettings)}
    assert {"max_batch_size", "batch_sizes", "index_kind", "data_dir", "decode_threads"} <= index
    assert not index & {"port", "host", "api_token", "max_queue", "max_delay_s", "demo"}
    train = {leaf.name for leaf in leaves(TrainSettings)}
    assert {"model", "weights", "epochs", "embedding_dim", "max_image_pixels"} <= train
    assert not train & {"port", "max_queue", "index_kind", "signature", "device"}


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--max-batch-size", "0"], {}, "max_batch_size must be at least 1"),
        (["--timeout-s", "0"], {}, "timeout_s must be above 0"),
        (["--port", "70000"], {}, "port must be at most 65535"),
        ([], {"BATCHSERVE_MAX_QUEUE": "many"}, "must be int"),
        ([], {"BATCHSERVE_WARMUP": "maybe"}, "true or false"),
        ([], {"BATCHSERVE_MAX_QEUE": "5"}, r"MAX_QEUE \(did you mean BATCHSERVE_MAX_QUEUE\?\)"),
        ([], {"BATCHSERVE_DEVICE": "tpu"}, "device must be one of"),
        (["--batch-sizes", "1,two"], {}, "batch_sizes must be integers"),
        (["--metrics-address", "9090"], {}, "metrics_address must be HOST:PORT"),
        ([], {"BATCHSERVE_METRICS_ADDRESS": "localhost:http"}, "metrics_address must be"),
        (["--forwarded-allow-ips", "10.0.0.5,nginx"], {}, "forwarded_allow_ips must be IP"),
        ([], {"BATCHSERVE_FORWARDED_ALLOW_IPS": "10.0.0.0/33"}, "forwarded_allow_ips must be"),
        ([], {"BATCHSERVE_SNAPSHOT_INTERVAL_S": "0"}, "snapshot_interval_s must be above 0"),
    ],
)
def test_bad_values_are_refused_with_the_setting_named(
    argv: list[str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        serve(argv, env)


def test_a_setting_of_another_command_in_the_environment_is_ignored_not_refused(
    tmp_path: Path,
) -> None:
    environ = {"BATCHSERVE_EPOCHS": "3", "BATCHSERVE_MAX_QUEUE": "9"}  # one for all commands
    assert serve([], environ).batching.max_queue == 9
    assert train(tmp_path, [], environ).epochs == 3


def test_unknown_key_in_file_is_refused(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("max_batchsize = 4\n")
    with pytest.raises(ConfigError, match=r"max_batchsize \(did you mean max_batch_size\?\)"):
        serve(["--config", str(toml)])
    toml.write_text("port = 4\n")  # a serve setting is not one of batchserve index
    with pytest.raises(ConfigError, match=r"unknown settings.*port"):
        parse(BulkSettings, ["--config", str(toml)], {})


def test_explicit_batch_sizes_always_include_the_max() -> None:
    s = serve(["--batch-sizes", "1,8,4", "--max-batch-size", "12"])
    assert s.batching.padded_batch_sizes() == [1, 4, 8, 12]


def test_help_answers_without_importing_tensorflow_or_faiss_before_openmp_is_quiet() -> None:
    code = (
        "import sys\n"
        "import batchserve.cli\n"
        "assert 'faiss' not in sys.modules, 'faiss imported before quiet_openmp ran'\n"
        "try:\n    batchserve.cli.main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n"
        "assert 'klein' not in sys.modules, 'klein imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--max-delay-s" in done.stdout and "BATCHSERVE_" in done.stdout
    assert "model settings:" in done.stdout and "batching settings:" in done.stdout


def test_index_help_lists_no_server_flag() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "batchserve.cli", "index", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "--index-kind" in done.stdout and "--max-batch-size" in done.stdout
    for flag in ("--port", "--api-token", "--max-queue", "--max-delay-s", "--demo"):
        assert flag not in done.stdout, flag


def test_bad_setting_exits_2_with_a_message() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "batchserve.cli", "serve", "--max-queue", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "max_queue must be at least 1" in done.stderr


def test_decode_threads_default_to_one_per_core(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert serve([]).server.decode_thread_count() == 16
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert serve([]).server.decode_thread_count() == 1
    assert serve(["--decode-threads", "3"]).server.decode_thread_count() == 3


def test_serving_makes_idle_openmp_threads_sleep_unless_the_user_chose() -> None:
    from batchserve.cli import quiet_openmp

    environ: dict[str, str] = {}
    quiet_openmp(environ)
    assert environ == {"OMP_WAIT_POLICY": "PASSIVE"}
    environ = {"OMP_WAIT_POLICY": "ACTIVE"}
    quiet_openmp(environ)
    assert environ == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_metrics_address_splits_into_host_and_port() -> None:
    assert serve(["--metrics-address", "0.0.0.0:9090"]).server.metrics_host_port() == (
        "0.0.0.0",
        9090,
    )
    assert serve(["--metrics-address", "[::1]:0"]).server.metrics_host_port() == ("::1", 0)


def test_trusted_proxies_are_addresses_and_networks_star_for_any_empty_for_none() -> None:
    def trusted(value: str) -> list[str]:
        networks = serve(["--forwarded-allow-ips", value]).server.trusted_proxies()
        return [str(network) for network in networks]

    assert [str(n) for n in ServerSettings().trusted_proxies()] == ["127.0.0.1/32", "::1/128"]
    assert trusted(" 10.0.0.5 , 192.168.0.0/16,fd00::/8") == [
        "10.0.0.5/32",
        "192.168.0.0/16",
        "fd00::/8",
    ]
    assert trusted("10.1.2.3/8") == ["10.0.0.0/8"]  # the network the address is in
    assert trusted("*") == ["0.0.0.0/0", "::/0"]
    assert trusted("") == []
    for bad in ("localhost", "10.0.0.0/8;10.1.0.0/16", "::1/129", "**"):
        with pytest.raises(ConfigError, match="forwarded_allow_ips must be"):
            ServerSettings(forwarded_allow_ips=bad)


def train(tmp_path: Path, argv: list[str], environ: dict[str, str]) -> TrainSettings:
    parser = argparse.ArgumentParser()
    add_arguments(parser, TrainSettings)
    args = parser.parse_args(argv)
    return load(TrainSettings, args, environ, data_dir=tmp_path, out=tmp_path / "model")


def test_train_settings_come_from_the_same_tree(tmp_path: Path) -> None:
    s = train(tmp_path, ["--epochs", "2", "--max-image-pixels", "1000"], {"BATCHSERVE_SEED": "7"})
    assert (s.epochs, s.seed, s.images.max_pixels, s.out) == (2, 7, 1000, tmp_path / "model")
    assert s.model.source == "builtin"
    with pytest.raises(ConfigError, match=r"dropout must be at most 0\.99"):
        train(tmp_path, ["--dropout", "1"], {})
    with pytest.raises(ConfigError, match="embedding_dim must be at least 1"):
        TrainSettings(tmp_path, tmp_path, embedding_dim=0)  # built in code, too


def test_a_table_of_chosen_settings_has_their_rows_of_the_full_table_in_the_given_order() -> None:
    table = chosen_settings_table(ServeSettings, ["timeout_s", "host"]).splitlines()
    full = settings_table(ServeSettings).splitlines()
    assert table[:2] == full[:2]
    assert [row.split(" | ")[0] for row in table[2:]] == ["| `--timeout-s`", "| `--host`"]
    assert all(row in full for row in table)


def test_a_table_of_chosen_settings_refuses_a_name_that_is_no_setting() -> None:
    with pytest.raises(ValueError, match="no such settings: max_batch"):
        chosen_settings_table(ServeSettings, ["host", "max_batch"])


def test_rendering_rewrites_only_the_readme_block_and_writes_the_settings_page(
    tmp_path: Path,
) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- settings:start (x) -->\nold\n<!-- settings:end -->\nrest\n")
    page = tmp_path / "docs" / "settings.md"
    assert render_readme(readme) and render_settings_page(page)
    text = readme.read_text()
    assert text.startswith("intro\n<!-- settings:start (x) -->\n| flag |")
    assert text.endswith("|\n<!-- settings:end -->\nrest\n") and "old" not in text
    assert page.read_text() == settings_page()
    assert settings_table(ServeSettings) in settings_page()
    assert not render_readme(readme) and not render_settings_page(page)


def test_a_catalog_is_sqlite_or_a_postgresql_url() -> None:
    assert StoreSettings().shared_catalog is False and StoreSettings().open_catalog(8) is None
    assert StoreSettings(catalog="postgresql://u@h:5432/d").shared_catalog
    with pytest.raises(ConfigError, match="catalog must be 'sqlite' or a postgresql:// URL"):
        StoreSettings(catalog="mysql://u@h/d")


def test_item_views_need_a_queue_that_holds_the_largest_add_with_its_views() -> None:
    assert parse(ServeSettings, ["--crop-views", "--grey-view"]).model.crop_views  # 64 x 7
    with pytest.raises(ConfigError, match=r"cannot hold an add of .* 64 images .*\(448 model"):
        parse(ServeSettings, ["--crop-views", "--grey-view", "--max-queue", "400"])
    assert parse(ServeSettings, ["--max-queue", "8"]).batching.max_queue == 8  # no views


# -- every settings dataclass checks its bounds when it is constructed -------------------


@pytest.mark.parametrize(
    ("build", "argv", "message"),
    [
        (lambda: BatchPolicy(max_queue=0), ["--max-queue", "0"], "max_queue must be at least 1"),
        (lambda: BatchPolicy(timeout_s=0.0), ["--timeout-s", "0"], "timeout_s must be above 0"),
        (
            lambda: BatchPolicy(max_delay_s=-0.001),
            ["--max-delay-s", "-0.001"],
            "max_delay_s must be at least 0",
        ),
        (lambda: ServerSettings(port=70000), ["--port", "70000"], "port must be at most 65535"),
        (
            lambda: RequestLimits(max_images=0),
            ["--max-images-per-request", "0"],
            "max_images_per_request must be at least 1",  # the flat name, not the field's
        ),
    ],
)
def test_a_component_built_in_code_is_refused_out_of_bounds_as_its_flag_is(
    build: Callable[[], object], argv: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as in_code:
        build()
    with pytest.raises(ConfigError, match=message) as from_flag:
        serve(argv)
    assert str(in_code.value) == str(from_flag.value)


def test_a_choice_built_in_code_must_be_one_of_the_choices() -> None:
    with pytest.raises(ConfigError, match="log_format must be one of text, json, got 'xml'"):
        ServerSettings(log_format="xml")
    assert ServerSettings(log_format="json").log_format == "json"


def test_values_on_the_bounds_are_accepted_in_code() -> None:
    policy = BatchPolicy(max_queue=1, max_delay_s=0.0, timeout_s=0.001, max_batch_size=1)
    assert (policy.max_queue, policy.max_delay_s, policy.padded_batch_sizes()) == (1, 0.0, [1])
    assert ServerSettings(port=65535, decode_nice=19).port == 65535


def test_a_copy_with_a_value_out_of_bounds_is_refused() -> None:
    with pytest.raises(ConfigError, match="max_batch_size must be at least 1, got 0"):
        dataclasses.replace(BatchPolicy(), max_batch_size=0)


def test_a_components_own_checks_still_run_after_its_bounds() -> None:
    with pytest.raises(ConfigError, match="batch_sizes must be integers"):
        BatchPolicy(batch_sizes="1,two")
    with pytest.raises(ConfigError, match="catalog must be 'sqlite' or a postgresql:// URL"):
        StoreSettings(catalog="mysql://db")
    with pytest.raises(ConfigError, match="metrics_address must be HOST:PORT"):
        ServerSettings(metrics_address="localhost:65536")  # the port's bound, once
    assert ServerSettings(metrics_address="[::1]:65535").metrics_host_port() == ("::1", 65535)


@dataclasses.dataclass(frozen=True)
class _Checked:
    count: int = setting(1, "a count", at_least=1)
    share: float = setting(0.5, "a share", at_least=0, at_most=1)

    def __post_init__(self) -> None:
        if self.count > 10:
            raise ConfigError("count over ten")


@dataclasses.dataclass(frozen=True)
class _CheckedToo(_Checked):
    kind: str = setting("a", "a kind", choices=("a", "b"))


def test_bounds_are_checked_before_the_class_own_post_init_and_for_subclasses() -> None:
    with pytest.raises(ConfigError, match=r"share must be at most 1, got 1\.5"):
        _Checked(count=11, share=1.5)  # the bound first, then the class's own check
    with pytest.raises(ConfigError, match="count over ten"):
        _Checked(count=11)
    with pytest.raises(ConfigError, match="kind must be one of a, b"):
        _CheckedToo(kind="c")
    with pytest.raises(ConfigError, match="count must be at least 1"):
        _CheckedToo(count=0)
    with pytest.raises(ConfigError, match="count over ten"):  # the inherited __post_init__
        _CheckedToo(count=11)
    assert _CheckedToo(count=10, share=1.0, kind="b").kind == "b"


def test_no_option_states_its_default_twice() -> None:
    import argparse

    from batchserve.cli import build_parser

    [commands] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for name, parser in commands.choices.items():
        for action in parser._actions:
            assert (action.help or "").count("(default") <= 1, (name, action.help)


def test_workers_is_auto_a_count_or_0_and_auto_is_one_edge_per_core_up_to_8() -> None:
    import os

    assert serve([]).server.edge_count() == min(8, len(os.sched_getaffinity(0)))
    assert serve(["--workers", "0"]).server.edge_count() == 0
    assert serve(["--workers", "3"]).server.edge_count() == 3
    for bad in ("-1", "65", "two"):
        with pytest.raises(ConfigError, match="workers must be auto or a number"):
            serve(["--workers", bad])
