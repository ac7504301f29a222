"""benchmarks/ablation_summary.py and the staleness ablation's pure helpers, against hand-computed values."""
import json
import math
from dataclasses import asdict, replace

import pytest

from areal_py.telemetry.step_record import OffPolicyBucket, StepRecord
from benchmarks.ablation_summary import (
    MeanSem,
    RunResult,
    cell_key,
    mean_sem,
    pool,
    read_runs,
    run_stem,
    summarize_cell,
    table,
    weighted_mean,
    write_run,
)


def run(seed: int, held: float, final: float, *, key: str = "k1", eta: int = 2, kl: float | None = 0.01,
        sps: float = 10.0, smax: int = 2) -> RunResult:
    return RunResult(task="arith", objective="naive", eta=eta, minibatches=4, seed=seed, cell_key=key,
                     overrides=["algo.loss=ppo", f"run.seed={seed}"], heldout_reward=held, heldout_n=16,
                     reward_final=final, reward_first=0.1, samples_per_s=sps, staleness_mean=smax / 2,
                     staleness_max=smax, update_kl=kl, approx_kl=None, steps=3, wall_s=1.0,
                     finished_utc="2026-12-02T09:00:00+00:00", command="python -m benchmarks.staleness_ablation")


def test_mean_sem_hand_computed():
    # (0.8, 0.6, 0.5, 0.7): mean 0.65, squared deviations 0.0225 + 0.0025 + 0.0225 + 0.0025 = 0.05,
    # sample variance 0.05 / 3, standard error sqrt(0.05 / 3) / 2
    m = mean_sem([0.8, 0.6, 0.5, 0.7])
    assert m.mean == pytest.approx(0.65) and m.n == 4
    assert m.sem == pytest.approx(math.sqrt(0.05 / 3) / 2)
    # two values: sem = |a - b| / 2
    assert mean_sem([0.3, 0.5]).sem == pytest.approx(0.1)
    assert mean_sem([0.4]) == MeanSem(0.4, None, 1)
    with pytest.raises(ValueError, match="no values"):
        mean_sem([])


def test_weighted_mean_ignores_empty_buckets():
    # (0.1 * 30 + 0.4 * 10) / 40 = 7 / 40
    assert weighted_mean([(0.1, 30), (0.4, 10), (9.9, 0)]) == pytest.approx(0.175)
    assert weighted_mean([]) is None and weighted_mean([(1.0, 0)]) is None


def test_summarize_cell_pools_seeds():
    c = summarize_cell([run(1, 0.6, 0.5, kl=0.02, sps=20.0, smax=1), run(0, 0.8, 0.7, kl=None, sps=10.0)])
    assert c.seeds == [0, 1] and c.eta == 2 and c.minibatches == 4 and c.objective == "naive"
    assert c.heldout_reward.mean == pytest.approx(0.7) and c.heldout_reward.sem == pytest.approx(0.1)
    assert c.reward_final.mean == pytest.approx(0.6) and c.reward_final.sem == pytest.approx(0.1)
    assert c.samples_per_s == pytest.approx(15.0) and c.staleness_max == 2
    assert c.staleness_mean == pytest.approx(0.75)
    assert c.update_kl == pytest.approx(0.02)  # only the run that measured it
    assert c.approx_kl is None
    with pytest.raises(ValueError, match="different cells or a seed twice"):
        summarize_cell([run(0, 0.5, 0.5), run(0, 0.6, 0.6)])
    with pytest.raises(ValueError, match="different cells"):
        summarize_cell([run(0, 0.5, 0.5), run(1, 0.6, 0.6, key="k2")])


def test_pool_orders_by_keys_dedups_seeds_and_skips_empty_cells():
    runs = [run(0, 0.2, 0.2, key="b", eta=4), run(0, 0.5, 0.5, key="a"), run(0, 0.9, 0.9, key="a"),
            run(1, 0.7, 0.7, key="a")]
    cells = pool(runs, ["a", "b", "missing"])
    assert [c.eta for c in cells] == [2, 4]
    assert cells[0].seeds == [0, 1]
    assert cells[0].heldout_reward.mean == pytest.approx(0.6)  # the first seed-0 file counts, not the copy
    assert cells[1].heldout_reward == MeanSem(0.2, None, 1)


def test_table_rows():
    md = table(pool([run(0, 0.8, 0.7), run(1, 0.6, 0.5)], ["k1"]))
    lines = md.splitlines()
    assert len(lines) == 3 and lines[0].startswith("| objective | minibatches | lr | eta |")
    assert lines[2] == ("| naive | 4 | config | 2 | 2 | 0.700 ± 0.100 | 0.600 ± 0.100 | 10.0 | 1.00 / 2 | 1.00e-02 | — |")
    lr_row = table(pool([replace(run(0, 0.2, 0.2), lr=3e-5)], ["k1"])).splitlines()[2]
    assert lr_row.startswith("| naive | 4 | 3e-05 | 2 | 1 | 0.200 (1 seed) |")
    assert "0.200 (1 seed)" in table(pool([run(0, 0.2, 0.2)], ["k1"]))


def test_run_files_round_trip(tmp_path):
    grid = tmp_path / "grid"
    r = run(3, 0.5, 0.4)
    path = write_run(grid, run_stem(r.objective, r.minibatches, r.eta, r.seed, r.cell_key), r)
    assert path.name == "naive-mb4-eta2-seed3-k1.json"
    (grid / "summary.json").write_text('{"table": "not a run"}')
    assert read_runs(grid) == [r]
    assert not list(grid.glob(".*.tmp"))
    assert run_stem("tis", 1, 4, 0, "k", 1e-5) == "tis-mb1-lr1e-05-eta4-seed0-k"
    # a record written before `lr` existed reads as the config's lr
    old = {k: v for k, v in asdict(r).items() if k != "lr"}
    (grid / "old.json").write_text(json.dumps(old | {"seed": 4}))
    assert [x.lr for x in read_runs(grid)] == [None, None]
    (grid / "bad.json").write_text('{"cell_key": "x"}')
    with pytest.raises(ValueError, match="missing"):
        read_runs(grid)


def test_cell_key_depends_on_every_override_and_its_order():
    a = cell_key(["algo.loss=ppo", "controller.max_staleness=2"])
    assert a == cell_key(["algo.loss=ppo", "controller.max_staleness=2"]) and len(a) == 10
    assert a != cell_key(["algo.loss=ppo", "controller.max_staleness=4"])
    assert a != cell_key(["controller.max_staleness=2", "algo.loss=ppo"])


def _rec(step: int, buckets: dict[str, tuple[float, int]] | None, approx: float | None) -> StepRecord:
    by = None if buckets is None else {k: OffPolicyBucket(tokens=n, kl_mean=kl, kl_max=kl, ess=1.0,
                                                          bounded_fraction=0.0) for k, (kl, n) in buckets.items()}
    return StepRecord(step=step, offpolicy_by_staleness=by, approx_kl=approx)


def test_update_kl_is_the_one_version_bucket_token_weighted():
    from benchmarks.staleness_ablation import mean_approx_kl, update_kl

    recs = [_rec(1, {"0": (0.0, 50)}, 0.0), _rec(2, {"1": (0.01, 30), "2": (0.5, 5)}, 0.02),
            _rec(3, {"1": (0.03, 10)}, None), _rec(4, None, 0.04)]
    # (0.01 * 30 + 0.03 * 10) / 40 = 0.015; the "2" bucket (two steps of drift) is not one update
    assert update_kl(recs) == pytest.approx(0.015)
    assert mean_approx_kl(recs) == pytest.approx(0.02)  # (0 + 0.02 + 0.04) / 3
    assert update_kl(recs[:1]) is None and mean_approx_kl([_rec(1, None, None)]) is None


def test_cell_overrides_and_cli_errors():
    from benchmarks.staleness_ablation import RECIPES, cell_overrides, parse_args

    o = cell_overrides("sum_cot", "tis", 4, 4, 10, 1e-5, False, ["x.y=1"], 512)
    assert o[:3] == ["#config=configs/sum_cot.yaml", "#heldout_n=512", "run.mode=async"]
    assert o[3:] == [*RECIPES["tis"], "controller.max_staleness=4", "trainer.ppo_minibatches=4",
                     "trainer.total_steps=10", "trainer.lr=1e-05", "x.y=1"]
    quick = cell_overrides("arith", "naive", 0, 1, 3, None, True, [], 16)
    assert "controller.batch_size=4" in quick and not any(x.startswith("trainer.lr=") for x in quick)
    with pytest.raises(SystemExit):
        parse_args(["--merge", "old.json"])
    with pytest.raises(SystemExit):
        parse_args(["--objectives", "naive,bogus"])
    for grid_key in ("trainer.ppo_minibatches=4", "algo.offpolicy.method=tis", "controller.max_staleness=1"):
        with pytest.raises(SystemExit):
            parse_args([grid_key])
    assert parse_args(["trainer.eps_clip=0.3"]).overrides == ["trainer.eps_clip=0.3"]


def test_recipes_are_valid_configs():
    """Every recipe loads as a config (algo.offpolicy's rules reject a setting the method ignores)."""
    from areal_py.config import load_config
    from benchmarks.staleness_ablation import RECIPES

    for name, overrides in RECIPES.items():
        cfg = load_config(None, overrides)
        assert cfg.algo.loss == ("ppo" if name == "naive" else "decoupled"), name
        op = cfg.algo.offpolicy
        assert (op.method, op.action, op.upper, op.behav_clip) == {
            "naive": ("filter", "clamp", 5.0, 0.2),   # the defaults, which algo.loss=ppo does not use
            "decoupled": ("filter", "clamp", 5.0, None),
            "filter_mask5": ("filter", "mask", 5.0, None), "tis": ("tis", "clamp", 2.0, None),
            "none": ("none", "clamp", 5.0, None), "behav_trust": ("filter", "clamp", 5.0, 0.2)}[name]


def test_pinned_recipes_keep_the_cell_keys_of_their_runs_from_before_the_default_changed():
    """The four recipes pinned to behav_clip=null map back to the key they had without the pin (their older
    run files), and only those: naive and behav_trust never had the pin."""
    from benchmarks.staleness_ablation import RECIPES, UNPINNED_TRUST, legacy_key

    for name, overrides in RECIPES.items():
        cell = ["#config=x", *overrides, "controller.max_staleness=4"]
        if name in ("naive", "behav_trust"):
            assert legacy_key(cell) is None, name
        else:
            old = [o for o in cell if o != UNPINNED_TRUST]
            assert len(old) == len(cell) - 1 and legacy_key(cell) == cell_key(old) != cell_key(cell), name


def test_plot_one_panel_per_minibatch_setting(tmp_path):
    """With matplotlib (the bench extra): a PNG is written; without it, plot says so by returning False."""
    from benchmarks.ablation_summary import plot

    cells = pool([run(0, 0.5, 0.5, key="a"), run(1, 0.7, 0.5, key="a"), run(0, 0.4, 0.4, key="b", eta=4)], ["a", "b"])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert plot(tmp_path / "p.png", cells) is False and not (tmp_path / "p.png").exists()
        return
    assert plot(tmp_path / "p.png", cells) is True
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_start_rewards_read_per_heldout_count(tmp_path):
    from benchmarks.staleness_ablation import start_rewards

    (tmp_path / "start-embedded-abc-n16.json").write_text(
        json.dumps({"start_model": "embedded-abc", "heldout_n": 16, "heldout_reward": 0.25}))
    (tmp_path / "start-embedded-abc-n512.json").write_text(
        json.dumps({"start_model": "embedded-abc", "heldout_n": 512, "heldout_reward": 0.3}))
    assert start_rewards(tmp_path, 16) == {"embedded-abc": 0.25}
    assert start_rewards(tmp_path, 128) == {}


def test_pool_refuses_runs_of_different_start_models():
    """The cold start differs across CPUs: one cell's seeds must share their start model's weights."""
    same = [replace(run(0, 0.5, 0.5), start_sha256="aa"), replace(run(1, 0.7, 0.7), start_sha256="aa"),
            run(2, 0.6, 0.6)]  # a record from before the field (None) pools with either
    assert pool(same, ["k1"])[0].seeds == [0, 1, 2]
    with pytest.raises(ValueError, match="different models .*aa, bb"):
        pool([*same, replace(run(3, 0.6, 0.6), start_sha256="bb")], ["k1"])


def test_pinning_the_start_model(tmp_path, monkeypatch):
    """--start-model installs the saved copy where the runs look; other weights already there are an error."""
    from types import SimpleNamespace

    import benchmarks.staleness_ablation as sa

    pinned, target = tmp_path / "pinned", tmp_path / "cache" / "embedded-x"
    pinned.mkdir()
    (pinned / "model.safetensors").write_bytes(b"weights one")
    (pinned / "config.json").write_text("{}")
    monkeypatch.setattr("areal_py.model_dir.embedded_model_request", lambda cfg: SimpleNamespace(path=target))
    assert sa.pin_start_model("sum_cot", pinned) == target
    assert (target / "config.json").exists()
    # sha256(b"weights one"), computed with `sha256sum`
    assert sa.weights_sha256(target) == "0b58304e84fd78c3ce0421116fbde92ed848ccea3aee4f2ff04489e1a49157eb"
    assert sa.pin_start_model("sum_cot", pinned) == target            # already there, same weights
    (pinned / "model.safetensors").write_bytes(b"weights two")
    with pytest.raises(SystemExit, match="already holds another start model"):
        sa.pin_start_model("sum_cot", pinned)


def test_start_rewards_name_the_start_weights(tmp_path):
    from benchmarks.staleness_ablation import start_rewards

    (tmp_path / "start-embedded-abc-0123456789ab-n512.json").write_text(json.dumps(
        {"start_model": "embedded-abc", "start_sha256": "0123456789abcdef", "heldout_n": 512, "heldout_reward": 0.5}))
    assert start_rewards(tmp_path, 512) == {"embedded-abc 0123456789ab": 0.5}
