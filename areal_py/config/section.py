"""The base of every config section: unknown keys are errors, assignments are validated."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A typo in a key must fail loudly, never fall back to a default; so must a bad value set later."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
