"""A local process speaking the wire protocol against a running controller with the issue's forged messages
(issue 20), for the rogue-peer end-to-end test. Plain ZMTP on loopback (no CURVE), as any local process may.

`Rogue.attack()` sends, and returns how many of each it sent (the controller's rejection reason each must be
counted under):
- 13 Results for gids nobody dispatched, from an id that never said hello (`unknown_server`);
- a Hello, then every Generate it is sent answered with token version 1,000,000 (`bad_version`: the group
  is generated again elsewhere; the rogue then goes silent, so it is declared dead and holds no work);
- a TrainerDone, a WeightsReady(path=/etc/passwd) and a racing WeightsReady of its own weights file (and one
  of its own tensors in the frames) on the trainer port (`not_trainer`);
- two DEALERs connected to the batch port (one under a trainer-like id), which must never receive a batch.
"""
from __future__ import annotations

import hashlib
import time
from collections import Counter
from pathlib import Path

import torch
import zmq
from safetensors.torch import save_file

from areal_py.config import Config
from areal_py.wire import protocol as P
from areal_py.wire.transport import make_socket, parse, send

HUGE_VERSION = 1_000_000


class Rogue:
    def __init__(self, cfg: Config, scratch: Path) -> None:
        self.cfg, self.scratch = cfg, scratch
        self.ctx = zmq.Context()
        net = cfg.net
        addr = "tcp://127.0.0.1:{}".format
        self.server = make_socket(self.ctx, zmq.DEALER, addr(net.rollout_port), bind=False, identity="rogue-server")
        self.ghost = make_socket(self.ctx, zmq.DEALER, addr(net.rollout_port), bind=False, identity="ghost")
        self.trainer = make_socket(self.ctx, zmq.DEALER, addr(net.trainer_port), bind=False, identity="rogue-trainer")
        self.thieves = [make_socket(self.ctx, zmq.DEALER, addr(net.batch_port), bind=False, identity=i)
                        for i in ("thief", "trainer-0000000000000000")]
        self.sent: Counter[str] = Counter()
        self.stolen = 0

    def forge_trainer(self, version: int) -> None:
        """The trainer's last word and three weight notices, none from the trainer."""
        send(self.trainer, P.TrainerDone(version=version))
        send(self.trainer, P.WeightsReady(version=version + 1, path="/etc/passwd", sha256="0" * 64))
        own = self.scratch / f"v{version + 1}.safetensors"
        save_file({"lm_head.weight": torch.zeros(4, 4)}, str(own), metadata={"version": str(version + 1)})
        digest = hashlib.sha256(own.read_bytes()).hexdigest()
        send(self.trainer, P.WeightsReady(version=version + 1, path=str(own), sha256=digest))
        send(self.trainer, P.WeightsReady(version=version + 1, path=None), {"lm_head.weight": torch.zeros(4, 4)})
        self.sent["not_trainer"] += 4

    def forge_results(self, seconds: float) -> None:
        """Results for unknown gids from a stranger; then join as a server and poison every group it is given."""
        for i in range(13):
            send(self.ghost, P.Result(gid=10_000 + i, attempt=0, idx=0, output_ids=[5], logprobs=[-1.0],
                                      versions=[0], finish_reason="stop"))
        self.sent["unknown_server"] += 13
        send(self.server, P.Hello(server_id="rogue-server", version=0))
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not self.server.poll(100):
                continue
            _, msg = parse(self.server.recv_multipart(copy=False), "rogue")
            if msg is None or not isinstance(msg.body, P.Generate):
                continue
            g = msg.body
            for idx in range(g.n):  # the first is bad_version; the group is then moved (a new attempt), so the
                send(self.server, P.Result(gid=g.gid, attempt=g.attempt, idx=idx, output_ids=[5, 6],  # rest stale
                                           logprobs=[-0.5, -0.5], versions=[0, HUGE_VERSION], finish_reason="stop"))
            self.sent["poisoned_groups"] += 1
            self.sent["poisoned_results"] += g.n

    def steal(self) -> int:
        """Anything that reached the batch-port thieves (must stay 0)."""
        for t in self.thieves:
            while t.poll(0):
                t.recv_multipart()
                self.stolen += 1
        return self.stolen

    def attack(self, version: int, seconds: float = 8.0) -> Counter[str]:
        self.forge_trainer(version)
        self.forge_results(seconds)
        self.steal()
        return self.sent

    def close(self) -> None:
        for s in (self.server, self.ghost, self.trainer, *self.thieves):
            s.close(linger=0)
        self.ctx.term()
