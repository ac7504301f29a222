"""Tools a rollout workflow calls between turns, run out of process with limits (docs/tools.md).

- :mod:`areal_py.tools.sandbox`: ``ToolSandbox(cfg).call(name, args) -> ToolResult``, the pool;
- :mod:`areal_py.tools.result`: ``ToolResult`` and the reasons a call ends;
- :mod:`areal_py.tools.registry`: tools by name (``calculator``, ``python``, ``module:function``);
- :mod:`areal_py.tools.calculator`, :mod:`areal_py.tools.python_eval`: the built-in tools;
- :mod:`areal_py.tools.isolation`, :mod:`areal_py.tools.worker`: the worker process and its confinement.

Deliberately empty of imports: a worker process imports only what it runs.
"""
