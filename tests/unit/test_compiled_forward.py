"""trainer.compile: the compiled training forward's checked fallback, its wiring into the learner, and
(one tiny real compile) its exactness against eager: logprobs, entropy and weight gradients to 1e-4."""
import logging

import pytest
import torch
from test_learner import batch
from tiny_models import tiny_model

from areal_py.config import load_config
from trainer.compiled_forward import CompiledLogprobs, compile_wanted
from trainer.learner import Learner
from trainer.rollout_batch import token_logprobs

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def right_padded_batch(lengths, width, vocab=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (len(lengths), width), generator=g)
    mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def outputs_and_grads(fn, model, ids, mask, with_entropy=True):
    """(logprobs, entropy, {name: grad}) of a loss reading the real positions, fresh gradients."""
    model.zero_grad(set_to_none=True)
    logp, ent = fn(model, ids, mask, 0.7, with_entropy=with_entropy)
    w = torch.randn(logp.shape, generator=torch.Generator().manual_seed(3))
    valid = mask[:, 1:].bool()
    loss = torch.where(valid, logp * w + (0.1 * ent if ent is not None else 0.0), 0.0).sum()
    loss.backward()
    return logp.detach(), None if ent is None else ent.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def assert_close(a, b, tol=1e-4):
    lp_a, ent_a, g_a = a
    lp_b, ent_b, g_b = b
    torch.testing.assert_close(lp_a, lp_b, atol=tol, rtol=0)
    if ent_a is not None or ent_b is not None:
        torch.testing.assert_close(ent_a, ent_b, atol=tol, rtol=0)
    assert g_a.keys() == g_b.keys()
    for k in g_a:
        torch.testing.assert_close(g_a[k], g_b[k], atol=tol, rtol=0, msg=k)


def test_compile_wanted_by_hand():
    assert compile_wanted("off", CUDA, 1, False)[0] is False
    assert compile_wanted("auto", CPU, 1, False) == (False, compile_wanted("auto", CPU, 1, False)[1])
    assert "off on cpu" in compile_wanted("auto", CPU, 1, False)[1]
    assert compile_wanted("auto", CUDA, 1, False)[0] is True
    assert compile_wanted("on", CPU, 1, False)[0] is True
    for ws, ac in ((2, False), (1, True)):
        on, why = compile_wanted("on", CPU, ws, ac)
        assert not on and "world size 1" in why
    with pytest.raises(ValueError, match="auto, off or on"):
        compile_wanted("yes", CPU, 1, False)


def identity(fn):
    return fn


def test_identity_compiler_is_exact_and_checked_once():
    """With a compiler that returns the function itself the compiled path is the model's own: outputs and
    gradients equal eager; the first call is checked, later ones (no new graph) run the compiled path."""
    ids, mask = right_padded_batch([5, 9, 2], 9)
    eager_model, model = tiny_model(), tiny_model()
    c = CompiledLogprobs(model, compiler=identity, graphs=lambda: 0)
    for width in (9, 6):
        assert_close(outputs_and_grads(c, model, ids[:, :width], mask[:, :width]),
                     outputs_and_grads(token_logprobs, eager_model, ids[:, :width], mask[:, :width]), tol=1e-6)
    assert c.status.active and c.status.checks == 1 and c.status.compiled_calls == 1
    assert "forward" not in vars(c.layers[0])  # the layers are the plain modules again after a call


def test_compile_failure_falls_back_to_eager(caplog):
    def refuses(fn):
        raise RuntimeError("no compiler here")

    model = tiny_model()
    with caplog.at_level(logging.WARNING, logger="trainer"):
        c = CompiledLogprobs(model, compiler=refuses)
    assert not c.status.active and "no compiler here" in c.status.reason
    assert "running eager" in caplog.text
    ids, mask = right_padded_batch([4, 7], 7)
    assert_close(outputs_and_grads(c, model, ids, mask), outputs_and_grads(token_logprobs, model, ids, mask), tol=0)


def test_failure_while_running_falls_back_to_eager():
    def breaks_on_call(fn):
        def run(*a, **k):
            raise RuntimeError("inductor exploded")
        return run

    model = tiny_model()
    c = CompiledLogprobs(model, compiler=breaks_on_call, graphs=lambda: 0)
    ids, mask = right_padded_batch([4, 7], 7)
    assert_close(outputs_and_grads(c, model, ids, mask), outputs_and_grads(token_logprobs, model, ids, mask), tol=0)
    assert not c.status.active and "inductor exploded" in c.status.reason
    assert "forward" not in vars(c.layers[0])


@pytest.mark.parametrize("what", ["logprobs", "gradient"])
def test_mismatch_turns_compile_off_and_trains_eager(what):
    """A compiled graph whose output (or only its backward) is off by more than 1e-4 is caught by the check:
    compile goes off for the run and the call's outputs are eager's, so the update is eager's."""
    def perturbs(fn):
        if fn.__name__ != "logprobs_from_logits":
            return fn

        def run(*a, **k):
            logp, ent = fn(*a, **k)
            if what == "logprobs":
                return logp + 1e-3, ent
            return logp + (logp - logp.detach()) * 1e-2, ent  # same values, gradient scaled by 1.01
        return run

    ids, mask = right_padded_batch([5, 9, 2], 9)
    model = tiny_model()
    c = CompiledLogprobs(model, compiler=perturbs, graphs=lambda: 0)
    assert_close(outputs_and_grads(c, model, ids, mask), outputs_and_grads(token_logprobs, model, ids, mask), tol=0)
    assert not c.status.active
    assert ("compiled logprobs differs" if what == "logprobs" else "compiled gradient of") in c.status.reason


def test_eager_cases_skip_the_compiled_path():
    """No gradients (proximal/reference forwards), a mask that is not right padding, another model: eager."""
    calls = []

    def counting(fn):
        def run(*a, **k):
            calls.append(fn.__name__)
            return fn(*a, **k)
        return run

    model, other = tiny_model(), tiny_model(seed=1)
    c = CompiledLogprobs(model, compiler=counting, graphs=lambda: 0)
    ids, mask = right_padded_batch([5, 9], 9)
    with torch.no_grad():
        c(model, ids, mask, 1.0)
    c(model, ids.flip(1), mask.flip(1), 1.0)  # left padding: the mask must reach the model
    c(other, ids, mask, 1.0)
    assert calls == [] and c.status.checks == 0


def test_learner_with_compile_on_trains_like_eager(monkeypatch):
    """trainer.compile=on wires the compiled path into the training forward (here with torch.compile an
    identity, so it runs in milliseconds): one update's loss and gradients equal the eager learner's, and the
    step reports its compile seconds."""
    def step(mode):
        cfg = load_config(None, ["controller.group_size=4", f"trainer.compile={mode}", "algo.entropy_coef=0.01",
                                 "trainer.max_tokens_per_micro_batch=24", "trainer.micro_batch_packing=padded"])
        learner = Learner(cfg, tiny_model(max_positions=128), model_dir=None)
        learner.optimizer.step = lambda: None
        stats = learner.train_step(batch(), 3)
        return learner, stats, {k: p.grad.clone() for k, p in learner.model.named_parameters()}

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    on, on_stats, on_grads = step("on")
    off, off_stats, off_grads = step("off")
    assert on.compiled is not None and on.compiled.status.active and off.compiled is None
    assert on.compiled.status.checks >= 1 and on_stats["compile_s"] >= 0 and "compile_s" not in off_stats
    assert on_stats["loss"] == pytest.approx(off_stats["loss"], abs=1e-6)
    for k in off_grads:
        torch.testing.assert_close(on_grads[k], off_grads[k], atol=1e-6, rtol=0, msg=k)
    assert Learner(load_config(None, []), tiny_model(), model_dir=None).compiled is None  # auto on CPU: eager


@pytest.mark.slow
def test_tiny_real_compile_matches_eager():
    """(slow: tens of seconds to minutes of inductor compile on a loaded 2-core machine) A real torch.compile (inductor, dynamic shapes) of a tiny model: two widths and a single row, with
    entropy; every call's outputs and gradients equal eager's to 1e-4 and the check found no mismatch."""
    torch._dynamo.reset()
    ids, mask = right_padded_batch([5, 9, 2, 9], 9)
    eager_model, model = tiny_model(), tiny_model()
    c = CompiledLogprobs(model)
    for rows, width in ((4, 9), (3, 7), (1, 5), (2, 6)):
        args = ids[:rows, :width], mask[:rows, :width]
        assert_close(outputs_and_grads(c, model, *args), outputs_and_grads(token_logprobs, eager_model, *args))
    assert c.status.active, c.status.reason
    assert c.status.compiled_calls >= 1 and c.status.checks >= 1 and c.status.max_diff <= 1e-4
