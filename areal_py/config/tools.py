"""The tool sandbox: how many workers run tool calls, and the limits each call runs under."""
from __future__ import annotations

from pydantic import Field, field_validator

from areal_py.config.section import Section

DEFAULT_PYTHON_MODULES = ["math", "cmath", "fractions", "decimal", "statistics", "itertools", "functools",
                          "collections", "operator", "string", "re", "json", "random", "heapq", "bisect", "datetime"]


class ToolsConfig(Section):
    """``tools``: the sandbox of areal_py.tools (docs/tools.md). Built-in tools: calculator, python."""
    workers: int = Field(2, ge=1, le=64, description="Worker processes running tool calls at once; calls beyond them "
                         "wait in a queue (tools.queue_timeout_s).")
    timeout_s: float = Field(5.0, gt=0, allow_inf_nan=False, description="Wall-clock limit of one call; past it the "
                             "worker is killed and replaced and the call returns a timeout error observation.")
    queue_timeout_s: float = Field(30.0, gt=0, allow_inf_nan=False, description="How long a call waits for a free "
                                   "worker before it returns a `busy` error observation without running.")
    memory_mb: int = Field(1024, ge=64, description="Address-space limit of a worker (RLIMIT_AS), in MiB; a call "
                           "past it returns a `memory` error and the worker is replaced.")
    cpu_s: int = Field(10, ge=1, description="CPU-time limit of one call (RLIMIT_CPU), in seconds; past it the kernel "
                       "kills the worker and the call returns a `cpu` error.")
    max_output_chars: int = Field(4000, ge=64, description="Characters of a tool's output returned; a longer output "
                                  "is cut, ending in a '[output truncated: N chars]' marker.")
    python_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_PYTHON_MODULES), description="Modules "
                                      "the `python` tool's snippets may import.")
    netns: bool = Field(True, description="Run workers in a network namespace of their own where the kernel allows "
                        "it without privileges (else the audit hook alone refuses network use).")
    custom: dict[str, str] = Field(default_factory=dict, description="Your own tools, {name: "
                                   "'package.module:function'}; importable in a fresh Python process.")

    @field_validator("python_modules")
    @classmethod
    def _plain_modules(cls, value: list[str]) -> list[str]:
        for name in value:
            if not name.isidentifier() or name.startswith("_"):
                raise ValueError(f"tools.python_modules: {name!r} is not a top-level public module name")
        return value
