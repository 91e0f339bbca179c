"""The API as a real server (`uvicorn api.main:app`, one process) for tests that time it or fuzz it over HTTP."""

from __future__ import annotations

import asyncio
import os
import socket
import sys

import httpx

from tests.conftest import ROOT


class api_server:  # noqa: N801  (used as `async with api_server() as base_url`)
    """`uvicorn api.main:app` on a free port, with the suite's settings; killed on exit."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = {**os.environ, **(env or {})}

    async def __aenter__(self) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "uvicorn",
            "api.main:app",
            "--port",
            str(port),
            "--log-level",
            "warning",
            cwd=ROOT,
            env=self.env,
        )
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base) as c:
            for _ in range(200):
                try:
                    if (await c.get("/healthz")).status_code == 200:
                        return base
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
        raise AssertionError("the API did not start")

    async def __aexit__(self, *exc: object) -> None:
        self.proc.terminate()
        await self.proc.wait()
