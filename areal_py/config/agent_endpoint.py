"""rollout.openai: the OpenAI-compatible endpoint that serves the model to agent code (workflow openai_agent)."""
from __future__ import annotations

from pydantic import Field

from areal_py.config.section import Section


class OpenAIEndpointConfig(Section):
    host: str = Field("127.0.0.1", description="Address the endpoint binds (an ephemeral port). Loopback only by "
                      "default: the agents run in the controller process; an api key is an unguessable episode token, "
                      "but the HTTP is not encrypted.")
    model_name: str = Field("areal-py", description="The `model` a request must name; any other gets a 404 "
                            "model_not_found error.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body in bytes; a larger one gets "
                                "413 and is not read.")
    max_message_chars: int = Field(1 << 20, ge=1, description="Most characters of message content (or prompt text) "
                                   "in one request; more gets 400.")
