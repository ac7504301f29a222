"""`rollout.workflow` -> a Workflow: a built-in name or ``package.module:Class``, like reward functions."""
from __future__ import annotations

from areal_py.import_spec import load_object
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
    cls = load_object(spec, f"rollout.workflow={spec!r}", f"one of {sorted(BUILTIN_WORKFLOWS)} or 'package.module:Class'")
    if not isinstance(cls, type) or not callable(getattr(cls, "run", None)):
        raise ValueError(f"rollout.workflow={spec!r} is not a class with a run(prompt, prompt_ids, env) method")
    return cls


def load_workflow(spec: str, settings: WorkflowSettings) -> Workflow:
    """An instance of the workflow `spec` names, built with `settings`."""
    wf = workflow_class(spec)(settings)
    if not isinstance(wf, Workflow):
        raise ValueError(f"rollout.workflow={spec!r}: its instance has no run method")
    return wf
