"""A process running a Supervisor with one stand-in instance; prints the child's pid."""

import asyncio
import sys
from pathlib import Path

from shoal.control.supervisor import Supervisor

FAKE = str(Path(__file__).with_name("fake_instance.py"))


async def main() -> None:
    sup = Supervisor(lambda s, i, p: [sys.executable, FAKE, "ok", str(p)], output=None)
    await sup.scale("orphan", 1)
    await sup.wait_ready(20)
    print(sup.instances["orphan-1"].pid, flush=True)
    await asyncio.sleep(60)


asyncio.run(main())
