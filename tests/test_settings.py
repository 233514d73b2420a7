"""Each setting is declared once (stream/settings.py): the environment, the flags of `clv` (their
help and checks) and `clv config` follow from it."""
from __future__ import annotations

import pytest

from stream.cli import SETTING, build_parser, main
from stream.settings import Settings, SettingsError


def _setting_flags():
    parser = build_parser()
    parsers = [parser, *parser._subparsers._group_actions[0].choices.values()]  # every subcommand
    for p in parsers:
        for action in p._actions:
            if action.dest.startswith(SETTING):
                yield p.prog, action


def test_every_setting_flag_says_the_settings_own_meaning_and_default():
    seen = set()
    for prog, action in _setting_flags():
        name = action.dest[len(SETTING):]
        field = Settings.model_fields[name]
        assert action.help.startswith(field.description), (prog, action.option_strings)
        if field.default != "":
            assert action.help.endswith(f"(default {field.default})"), (prog, action.option_strings)
        assert action.default is None  # not given: the environment's value or the default stands
        seen.add(name)
    assert {"batch_wait_ms", "bootstrap_servers", "snapshot_path", "api_port", "log_level"} <= seen


@pytest.mark.parametrize("argv, words", [
    (["worker", "--batch-size", "0"], "--batch-size: must be a positive whole number: '0'"),
    (["worker", "--web-port", "70000"], "--web-port: must be a whole number from 1 to 65535"),
    (["api", "--rate-limit-per-min", "-1"], "must be a whole number, 0 or more: '-1'"),
    (["snapshot", "--interval", "inf"], "--interval: must be a positive number: 'inf'"),
    (["--log-level", "loud", "config"], "must be one of 'debug', 'info', 'warning', 'error'"),
])
def test_a_bad_setting_flag_is_one_line_before_any_work(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("clv: error: ") and words in err and err.count("\n") == 1


def test_the_environment_is_read_once_typed_with_its_aliases_and_flags_win():
    env = {"CLV_BATCH_SIZE": "7", "KAFKA_BOOTSTRAP_SERVERS": "k:1", "CLV_WEB_HOST": "", "CLV_LOG_LEVEL": "DEBUG"}
    s = Settings.from_env(env, batch_size=None, partitions=8)
    assert (s.batch_size, s.bootstrap_servers, s.web_host, s.partitions, s.log_level) == \
        (7, "k:1", "127.0.0.1", 8, "debug")
    assert Settings.from_env({**env, "CLV_BOOTSTRAP_SERVERS": "mine:2"}).bootstrap_servers == "mine:2"
    with pytest.raises(SettingsError, match="batch_size: input should be a valid integer"):
        Settings.from_env({"CLV_BATCH_SIZE": "lots"})
    with pytest.raises(SettingsError, match=r"min_insync_replicas \(2\) cannot exceed replication_factor"):
        Settings.from_env({"CLV_MIN_INSYNC_REPLICAS": "2"})
    with pytest.raises(SettingsError, match="store must be memory:// or rocksdb://"):
        Settings.from_env({}, store="redis://x")
