"""What every message body shares: the strict pydantic base and the bounded types used across families.

Invariants: a body rejects any field it does not declare (`extra="forbid"`), so a typo or a newer peer's
field is an error, never silently dropped; a `Count` is bounded far below msgpack's int64, and a `Session`
to 64 characters.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MAX_COUNT = 2**62  # bound of every counter on the wire: far above any run, far below msgpack's int64


Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


Session = Annotated[str, StringConstraints(max_length=64)]
"""A controller process's random id (`Ping.session`); on a controller's message to a server, whose it is."""
