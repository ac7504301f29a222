"""calc_tool with and without the tool: held-out reward of a model directory under both workflows.

`without`: one sampled response per prompt (single_turn; trainer.cold_start.evaluate, Hugging Face
generate): a call the model writes is never answered, so only a right direct answer scores. `with`:
the built-in `tool_loop` workflow against a local env (Hugging Face generate for each turn, the
calculator called in process; the sandbox isolates nothing here, the tool is ours), the same rule
as a run. Both sample at temperature 1 from held-out prompts (indices from 10**6 on, far past any
run's data position). Also: turns per episode and the share of rewarded episodes that called the tool.

    python -m benchmarks.calc_tool_eval MODEL_DIR [MODEL_DIR ...] --n 256
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

import torch

from areal_py.models import eos_token_id, load_model_and_tokenizer
from areal_py.tasks.calc_tool import CalcToolTask
from areal_py.tasks.prompt_render import render_prompt
from areal_py.tools.calculator import calculator
from areal_py.workflow.api import Turn
from areal_py.workflow.assembly import assemble
from areal_py.workflow.builtin import ToolLoop, WorkflowSettings
from trainer.cold_start import evaluate

HELD_OUT = 10**6


class _Result:
    def __init__(self, ok: bool, output: str, error: str | None) -> None:
        self.ok, self.output, self.error = ok, output, error


class LocalEnv:
    """An EpisodeEnv on one process: each turn sampled by `model.generate`, the calculator called in process."""

    def __init__(self, model: Any, tokenizer: Any, max_new_tokens: int) -> None:
        self.model, self._tok, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.eos = eos_token_id(tokenizer)

    @property
    def tokenizer(self) -> Any:
        return self._tok

    @torch.no_grad()
    def generate(self, context_ids: Sequence[int], max_new_tokens: int | None = None) -> Turn:
        ids = torch.tensor([list(context_ids)])
        room = self.model.config.max_position_embeddings - ids.shape[1]
        n = min(max_new_tokens or self.max_new_tokens, self.max_new_tokens, room)
        if n < 1:
            return Turn([], [], [], "length")
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=True,
                                  temperature=1.0, top_k=0, top_p=1.0, pad_token_id=self.eos, eos_token_id=self.eos)
        new = out[0, ids.shape[1]:].tolist()
        stopped = self.eos in new
        new = new[:new.index(self.eos) + 1] if stopped else new
        return Turn(new, [0.0] * len(new), [0] * len(new), "stop" if stopped else "length")

    def call_tool(self, name: str, args: Any) -> _Result:
        try:
            return _Result(True, calculator(args), None)
        except Exception as e:  # noqa: BLE001 - the error is the observation, as in the sandbox
            return _Result(False, "", f"{type(e).__name__}: {e}")


def with_tool(model: Any, tok: Any, task: CalcToolTask, n: int, max_new_tokens: int, seed: int) -> dict:
    torch.manual_seed(seed)
    env, flow = LocalEnv(model, tok, max_new_tokens), ToolLoop(WorkflowSettings(max_turns=3))
    special = set(tok.all_special_ids)
    reward = turns = succeeded = succeeded_tool = 0.0
    for i in range(n):
        prompt = task.prompt(HELD_OUT + i)
        ids = render_prompt(tok, prompt, "false", None)  # as the controller renders it (BOS first)
        ep = flow.run(prompt, list(ids), env)
        text = tok.decode([t for t in assemble(ep).output_ids if t not in special], skip_special_tokens=True)
        r = task.reward(prompt, text, ep.finish_reason == "stop")
        reward += r
        turns += ep.turns
        succeeded += r > 0
        succeeded_tool += r > 0 and ep.info.get("tool_calls", 0) > 0
    return {"reward": reward / n, "turns_per_episode": turns / n,
            "succeeded_with_tool_share": succeeded_tool / succeeded if succeeded else None}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    task = CalcToolTask(seed=0)
    for path in args.models:
        model, tok = load_model_and_tokenizer(path)
        without = evaluate(model, tok, task, n=args.n, max_new_tokens=args.max_new_tokens, start_index=HELD_OUT,
                           seed=args.seed)
        out = {"model": path, "n": args.n, "reward_without_tool": without,
               **with_tool(model, tok, task, args.n, args.max_new_tokens, args.seed)}
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
