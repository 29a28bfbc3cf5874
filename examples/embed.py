# Embedding tasknet's p2p node in your own trio program: two nodes in one process find each
# other, exchange a gossip message and a request/response, then stop. Run it with
#   .venv/bin/python examples/embed.py
# It needs no network beyond 127.0.0.1 and leaves nothing behind (temporary data dirs).
from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from p2p import MemberState, Network, NetworkConfig  # noqa: E402

NETWORK = "embed-demo"


def demo_config(data_dir: Path, bootstrap: list[str] | None = None) -> NetworkConfig:
    # heartbeats shorter than the defaults, so the demo converges in about a second
    return NetworkConfig(data_dir=data_dir, network_id=NETWORK, bootstrap=bootstrap or [],
                         heartbeat_interval=0.3, suspect_after=1.5, dead_after=3.0)


async def wait_until_alive(net: Network, peer_id: str) -> None:
    async with net.member_events() as events:
        if any(m.peer_id == peer_id and m.state is MemberState.ALIVE for m in net.members()):
            return
        async for event in events:
            if event.peer_id == peer_id and event.current is MemberState.ALIVE:
                return


async def gossip(sender: Network, receiver: Network, topic: str, payload: Any) -> Any:
    """Publish until `receiver` gets the message: a topic's gossip mesh forms at the next
    heartbeat after the subscription, so the first copies may go nowhere."""
    async with receiver.subscribe(topic) as subscription, trio.open_nursery() as nursery:
        async def publish_until_cancelled() -> None:
            while True:
                await sender.publish(topic, payload)
                await trio.sleep(0.2)

        nursery.start_soon(publish_until_cancelled)
        message = await subscription.next()
        nursery.cancel_scope.cancel()
        return message


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="tasknet-embed-") as tmp:
        base = Path(tmp)
        async with Network.start(demo_config(base / "alice")) as alice:
            print(f"alice {alice.peer_id} listening on {alice.addrs[0]}")
            async with Network.start(demo_config(base / "bob", [alice.addrs[0]])) as bob:
                print(f"bob   {bob.peer_id} joining through alice")

                async def greet(caller: str, message: Any) -> Any:
                    return {"greeting": f"hello {message['name']}", "caller": caller}

                bob.handle("greet", greet)  # served as /tasknet/embed-demo/greet/1

                with trio.fail_after(20):
                    await wait_until_alive(alice, bob.peer_id)
                    await wait_until_alive(bob, alice.peer_id)
                    print("alice and bob see each other alive")

                    message = await gossip(alice, bob, "news", {"round": 1, "text": "hi all"})
                    print(f"bob got gossip on {message.topic!r} from "
                          f"{'alice' if message.author == alice.peer_id else message.author}: "
                          f"{message.payload}")

                    reply = await alice.request(bob.peer_id, "greet", {"name": "alice"})
                    print(f"alice asked bob to greet her: {reply['greeting']!r}")
        print("both nodes stopped")


if __name__ == "__main__":
    trio.run(main)
