"""A flaky ZeroMQ proxy for fault-injection tests: it sits between a role and the controller and drops,
duplicates, delays and reorders whole messages (multipart frames untouched), each with its own probability.

- `RouterLink`: for a DEALER -> ROUTER link (rollout server or trainer -> controller). It binds a ROUTER where
  the role connects and, for every routing id that speaks to it, connects a DEALER under the same id to the
  controller, so the controller sees the role's own id; replies travel back the same way. A link that
  `follows` another opens its DEALER for every id that speaks on that one (the trainer's batch DEALER never
  speaks: the controller sends on it to the id of the trainer link).
- `PubLink`: for PUB -> SUB (the controller's weight notices): SUB on the controller, PUB for the roles.

Faults are drawn per message and direction from one seeded `random.Random`: dropped with `drop`; else sent
twice with `duplicate`; each copy waits uniform [0, `delay_s`]; with `reorder` a copy waits `hold_s` more, so
the messages after it overtake it. What was done is counted in `FaultProxy.counts` ((direction, fault) -> n).
One thread runs every socket (ZeroMQ sockets are not thread-safe); `close()` stops it.
"""
from __future__ import annotations

import heapq
import itertools
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import zmq


@dataclass(frozen=True)
class Faults:
    drop: float = 0.0
    duplicate: float = 0.0
    delay_s: float = 0.0
    reorder: float = 0.0
    hold_s: float = 0.3


@dataclass
class RouterLink:
    listen: str  # where the role connects, e.g. tcp://127.0.0.1:5555
    target: str  # the controller's ROUTER
    up: Faults  # role -> controller
    down: Faults  # controller -> role
    name: str = "link"
    follows: str = ""  # the name of the link whose new routing ids this one connects too


@dataclass
class PubLink:
    listen: str
    target: str
    down: Faults
    name: str = "pub"


class FaultProxy:
    def __init__(self, links: list[RouterLink | PubLink], seed: int = 0) -> None:
        self.links = links
        self.rng = random.Random(seed)
        self.counts: Counter[tuple[str, str]] = Counter()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _schedule(self, queue: list, seq, direction: str, faults: Faults, frames: list[bytes],
                  deliver: Callable[[list[bytes]], None]) -> None:
        self.counts[(direction, "seen")] += 1
        if self.rng.random() < faults.drop:
            self.counts[(direction, "dropped")] += 1
            return
        copies = 1
        if self.rng.random() < faults.duplicate:
            copies = 2
            self.counts[(direction, "duplicated")] += 1
        now = time.monotonic()
        for _ in range(copies):
            wait = self.rng.uniform(0.0, faults.delay_s)
            if self.rng.random() < faults.reorder:
                wait += faults.hold_s
                self.counts[(direction, "held")] += 1
            heapq.heappush(queue, (now + wait, next(seq), deliver, frames))

    def _run(self) -> None:
        ctx = zmq.Context()
        socks: list[zmq.Socket] = []
        handlers: dict[zmq.Socket, Callable[[], None]] = {}
        poller = zmq.Poller()
        queue: list = []
        seq = itertools.count()
        openers: dict[str, list[Callable[[bytes], zmq.Socket]]] = {}  # link name -> its followers' open()

        def add(sock: zmq.Socket, handler: Callable[[], None]) -> None:
            sock.setsockopt(zmq.LINGER, 0)
            socks.append(sock)
            handlers[sock] = handler
            poller.register(sock, zmq.POLLIN)

        def router_link(link: RouterLink) -> None:
            front = ctx.socket(zmq.ROUTER)
            front.bind(link.listen)
            backs: dict[bytes, zmq.Socket] = {}

            def to_role(ident: bytes) -> Callable[[list[bytes]], None]:
                return lambda frames: front.send_multipart([ident, *frames])

            def open_back(ident: bytes) -> zmq.Socket:
                back = backs.get(ident)
                if back is None:  # a new peer: its own DEALER to the controller, under its own routing id
                    back = ctx.socket(zmq.DEALER)
                    back.setsockopt(zmq.IDENTITY, ident)
                    back.connect(link.target)
                    backs[ident] = back
                    add(back, lambda b=back, i=ident: self._schedule(queue, seq, f"{link.name}:down", link.down,
                                                                      b.recv_multipart(), to_role(i)))
                    for follower in openers.get(link.name, []):
                        follower(ident)
                return back

            def from_role() -> None:
                ident, *frames = front.recv_multipart()
                self._schedule(queue, seq, f"{link.name}:up", link.up, frames, open_back(ident).send_multipart)

            if link.follows:
                openers.setdefault(link.follows, []).append(open_back)

            add(front, from_role)

        def pub_link(link: PubLink) -> None:
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(link.target)
            pub = ctx.socket(zmq.PUB)
            pub.bind(link.listen)
            socks.append(pub)
            add(sub, lambda: self._schedule(queue, seq, f"{link.name}:down", link.down, sub.recv_multipart(),
                                            pub.send_multipart))

        try:
            for link in self.links:
                (router_link if isinstance(link, RouterLink) else pub_link)(link)
            self._ready.set()
            while not self._stop.is_set():
                now = time.monotonic()
                while queue and queue[0][0] <= now:
                    _, _, deliver, frames = heapq.heappop(queue)
                    try:
                        deliver(frames)
                    except zmq.ZMQError:  # a peer gone: the message is lost, as on a real network
                        self.counts[("any", "undeliverable")] += 1
                timeout = 50 if not queue else max(0, min(50, int((queue[0][0] - now) * 1000)))
                for sock, _ in poller.poll(timeout):
                    handlers[sock]()
        except Exception as e:  # noqa: BLE001 - any failure of the thread is raised by close()
            self._error = e
            self._ready.set()
        finally:
            for s in socks:
                s.close(linger=0)
            ctx.term()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        if self._error is not None:
            raise RuntimeError("the fault proxy failed") from self._error
