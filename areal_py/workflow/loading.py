"""`rollout.workflow` -> a Workflow: a built-in name or ``package.module:Class``, like reward functions."""
from __future__ import annotations

import importlib

from areal_py.workflow.api import Workflow
from areal_py.workflow.builtin import SingleTurn, ToolLoop, WorkflowSettings
from areal_py.workflow.openai_agent import OpenAIAgentWorkflow

BUILTIN_WORKFLOWS: dict[str, type] = {"single_turn": SingleTurn, "tool_loop": ToolLoop,
                                      "openai_agent": OpenAIAgentWorkflow}


def workflow_class(spec: str) -> type:
    """The class `spec` names: a built-in (single_turn, tool_loop, openai_agent) or ``package.module:Class``.

    Raises ValueError naming rollout.workflow and what to change."""
    if spec in BUILTIN_WORKFLOWS:
        return BUILTIN_WORKFLOWS[spec]
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"rollout.workflow={spec!r}: expected one of {sorted(BUILTIN_WORKFLOWS)} or "
                         f"'package.module:Class'")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"rollout.workflow={spec!r} cannot be imported: {e} (is its package on PYTHONPATH?)") from e
    if not isinstance(cls, type) or not callable(getattr(cls, "run", None)):
        raise ValueError(f"rollout.workflow={spec!r} is not a class with a run(prompt, prompt_ids, env) method")
    return cls


def load_workflow(spec: str, settings: WorkflowSettings) -> Workflow:
    """An instance of the workflow `spec` names, built with `settings`."""
    wf = workflow_class(spec)(settings)
    if not isinstance(wf, Workflow):
        raise ValueError(f"rollout.workflow={spec!r}: its instance has no run method")
    return wf
