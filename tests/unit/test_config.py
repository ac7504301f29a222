from pathlib import Path

import pytest

from areal_py.config import Config, ConfigError, dump_config, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_default_yaml_is_the_embedded_default():
    assert load_config(ROOT / "configs" / "default.yaml") == Config()


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["controller.max_staleness=4", "trainer.lr=1e-4", "run.mode=sync",
                             "trainer.eps_clip_high=null", "run.name=abc"])
    assert cfg.controller.max_staleness == 4
    assert cfg.trainer.lr == pytest.approx(1e-4)
    assert cfg.run.mode == "sync" and cfg.effective_max_staleness == 0
    assert cfg.trainer.eps_clip_high is None and cfg.run.name == "abc"


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("controller:\n  batch_size: 4\n  group_size: 2\n")
    cfg = load_config(f, ["controller.batch_size=6"])
    assert (cfg.controller.batch_size, cfg.controller.group_size) == (6, 2)


def test_unknown_key_names_key_and_allowed_values():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["controller.max_stalenes=1"])
    msg = str(e.value)
    assert "controller.max_stalenes" in msg and "max_staleness" in msg and "batch_size" in msg


def test_unknown_section():
    with pytest.raises(ConfigError, match="unknown key 'bogus'.*run, model"):
        load_config(None, ["bogus.x=1"])


def test_bad_literal_names_allowed_values():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["run.mode=fast"])
    assert "run.mode" in str(e.value) and "'async'" in str(e.value) and "'sync'" in str(e.value)


def test_bad_number_and_range():
    with pytest.raises(ConfigError, match="controller.batch_size"):
        load_config(None, ["controller.batch_size=0"])
    with pytest.raises(ConfigError, match="trainer.lr"):
        load_config(None, ["trainer.lr=fast"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="min_operand"):
        load_config(None, ["task.min_operand=5", "task.max_operand=3"])
    with pytest.raises(ConfigError, match="task.path"):
        load_config(None, ["task.name=jsonl"])
    with pytest.raises(ConfigError, match="task.name=jsonl needs model.path"):
        load_config(None, ["task.name=jsonl", "task.path=data.jsonl"])


def test_non_utf8_config_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"trainer:\n  lr: 1e-4 # caf\xe9\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid UTF-8 \(byte 0xe9 at offset 25\)"):
        load_config(bad)


def test_token_staleness_limit_defaults_to_the_admission_bound_and_may_only_be_raised():
    assert load_config(None, ["controller.max_staleness=3"]).effective_max_token_staleness == 3
    cfg = load_config(None, ["controller.max_staleness=2", "controller.max_token_staleness=16"])
    assert cfg.effective_max_staleness == 2 and cfg.effective_max_token_staleness == 16
    assert load_config(None, ["controller.max_token_staleness=16", "run.mode=sync"]).effective_max_token_staleness == 0
    with pytest.raises(ConfigError, match=r"controller.max_token_staleness=1 is below controller.max_staleness=2"):
        load_config(None, ["controller.max_staleness=2", "controller.max_token_staleness=1"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["controller"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_malformed_yaml_names_file_line_and_column(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("controller:\n  batch_size: 4\n   group_size: 2\n")      # line 3 indented too deep
    with pytest.raises(ConfigError, match=r"bad\.yaml:3:14: invalid YAML: mapping values are not allowed here"):
        load_config(f)
    f.write_text("controller:\n  batch_size: [4, 8\n  group_size: 2\n")    # unclosed list opened on line 2
    with pytest.raises(ConfigError, match=r"bad\.yaml:3:13: invalid YAML: expected ',' or '\]', but got ':' "
                                          r"\(while parsing a flow sequence at line 2, column 15\)"):
        load_config(f)


def test_every_field_has_a_description():
    from pydantic import BaseModel

    def walk(cls: type[BaseModel], prefix: str):
        for name, f in cls.model_fields.items():
            assert f.description, f"{prefix}{name} has no description"
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
                walk(f.annotation, f"{prefix}{name}.")

    walk(Config, "")
    from areal_py.tasks.base import task_names, task_spec

    for name in task_names():  # the task section is one of these, chosen by task.name
        walk(task_spec(name).config, f"task[{name}].")


def test_task_section_round_trips_and_names_unknown_tasks(tmp_path):
    for cfg in (load_config(None), load_config(ROOT / "configs" / "sum_cot.yaml")):
        dump_config(cfg, tmp_path / "config.yaml")
        assert load_config(tmp_path / "config.yaml") == cfg
    with pytest.raises(ConfigError, match=r"task.name: unknown task 'sums'; allowed: \['arith', 'calc_tool', 'jsonl', 'sum_cot'\]"):
        load_config(None, ["task.name=sums"])
    with pytest.raises(ConfigError, match=r"task: a mapping"):
        load_config(None, ["task=3"])
