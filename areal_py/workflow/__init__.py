"""Rollout workflows: how one episode (single- or multi-turn, with tools) is produced, and how it is trained.

`api` holds the protocol and records, `assembly` turns an episode into the trained sequence,
`builtin` the single-turn and tool-loop workflows, `loading` resolves `rollout.workflow`.
"""
