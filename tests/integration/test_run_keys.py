"""Where a run's CURVE keys come from: `areal-py keys`, the launcher's own keys off loopback (kept across
--resume), and `areal-py serve` refusing a role off loopback without keys before it loads anything."""
from __future__ import annotations

from conftest import net_overrides

from areal_py.app import launcher
from areal_py.app.cli import main
from areal_py.config import load_config
from areal_py.wire.curve import KeyDir


def _overrides(tmp_path, *more: str) -> list[str]:
    return [f"run.output_dir={tmp_path / 'runs'}", "run.name=k", "run.dashboard_port=0", *net_overrides(), *more]


def test_keys_command_writes_the_pairs_and_says_where_each_goes(tmp_path, capsys) -> None:
    assert main(["keys", str(tmp_path / "k"), "--servers", "2"]) == 0
    out = capsys.readouterr().out
    assert "controller, trainer, rollout-0, rollout-1" in out
    assert "trainer (rank 0): controller.key, trainer.key_secret" in out
    assert "rollout server <id>: controller.key, <id>.key_secret" in out and "net.keys_dir=" in out
    assert set(KeyDir(tmp_path / "k").role_keys("rollout").values()) == {"rollout-0", "rollout-1"}
    assert main(["keys", str(tmp_path / "k")]) == 2  # never replaces keys roles may be using
    assert "already holds keys" in capsys.readouterr().err


def test_the_launcher_makes_a_runs_keys_off_loopback_and_keeps_them(tmp_path) -> None:
    local = launcher.prepare_run(None, _overrides(tmp_path, "run.name=local"), resume=False)
    assert local.net.keys_dir == "" and not (local.run_dir() / "keys").exists()  # loopback: plain, as before

    cfg = launcher.prepare_run(None, _overrides(tmp_path, "net.bind_host=0.0.0.0"), resume=False)
    keys = cfg.run_dir() / "keys"
    assert cfg.net.keys_dir == str(keys)
    assert load_config(cfg.run_dir() / "config.yaml").net.keys_dir == str(keys)  # what every role reads
    trainer = KeyDir(keys).pair("trainer")
    given = tmp_path / "mine"
    assert main(["keys", str(given)]) == 0
    chosen = launcher.prepare_run(None, _overrides(tmp_path, "run.name=chosen", "net.bind_host=0.0.0.0",
                                                   f"net.keys_dir={given}"), resume=False)
    assert chosen.net.keys_dir == str(given) and not (chosen.run_dir() / "keys").exists()  # yours are kept
    reached = launcher.prepare_run(None, _overrides(tmp_path, "run.name=reached", "net.controller_host=10.1.2.3"),
                                   resume=False)
    assert reached.net.keys_dir == str(reached.run_dir() / "keys")  # the roles would connect off loopback

    (cfg.run_dir() / "checkpoints" / "step_000001").mkdir(parents=True)
    resumed = launcher.prepare_run(None, _overrides(tmp_path, "net.bind_host=0.0.0.0"), resume=True)
    assert resumed.net.keys_dir == str(keys) and KeyDir(keys).pair("trainer") == trainer  # the same keys


def test_serve_refuses_a_role_off_loopback_without_keys(tmp_path, capsys) -> None:
    base = _overrides(tmp_path, "net.bind_host=0.0.0.0", "net.controller_host=10.11.12.13")
    assert main(["serve", "controller", *base]) == 2
    assert "refusing to listen on tcp://0.0.0.0:" in capsys.readouterr().err
    assert main(["serve", "trainer", *base]) == 2
    assert "refusing to connect to tcp://10.11.12.13:" in capsys.readouterr().err
    assert main(["keys", str(tmp_path / "k")]) == 0
    (tmp_path / "k" / "trainer.key_secret").chmod(0o644)
    assert main(["serve", "trainer", *base, f"net.keys_dir={tmp_path / 'k'}"]) == 2
    assert "chmod 600" in capsys.readouterr().err
    (tmp_path / "k" / "rollout.key").unlink()
    assert main(["serve", "controller", *base, f"net.keys_dir={tmp_path / 'k'}"]) == 2
    assert "lists no rollout key" in capsys.readouterr().err
