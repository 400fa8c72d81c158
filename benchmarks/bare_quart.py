"""The bare framework: a trivial quart-trio POST route under hypercorn, no sprocket at all."""

import json
import sys

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio

app = QuartTrio("bare")


@app.post("/generate")
async def generate() -> Response:
    body = json.loads(await request.get_data())
    return Response(json.dumps(body), mimetype="application/json")


async def main() -> None:
    config = Config()
    config.bind = [f"127.0.0.1:{sys.argv[1]}"]
    config.accesslog = None

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(lambda task_status: serve(app, config, task_status=task_status))
        print("listening", binds[0], flush=True)


trio.run(main)
