"""A minimal registered instance for control-plane tests (no Service SDK): serves /healthz
and /whoami on the gateway's HttpServer, registers in the Store, prints the ready line,
deregisters on SIGTERM."""

import asyncio
import json
import signal
import sys

from shoal.gateway.server import HttpServer, Response
from shoal.mesh.registry import Instance, Registry
from shoal.store.connect import connect_store


async def main(service: str, instance_id: str, port: int, store_url: str) -> None:
    store = await connect_store(store_url)
    server = HttpServer(lambda req: Response.json({"instance": instance_id, "path": req.path}))
    await server.start("127.0.0.1", port)
    registry = Registry(store)
    registration = await registry.register(
        Instance(id=instance_id, service=service, address=f"127.0.0.1:{port}"), ttl=3)
    print(json.dumps({"event": "ready", "instance": instance_id, "port": port}), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await registration.deregister()
    await server.shutdown(1.0)
    await store.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
