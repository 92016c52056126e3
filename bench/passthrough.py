"""The floor for this stack: FastAPI forwarding the prompt with AsyncOpenAI; no auth, no limits,
no database, no metrics. Served by the same gunicorn + uvicorn-worker as the service."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from openai import AsyncOpenAI
from pydantic import BaseModel

client = AsyncOpenAI(
    api_key="bench", base_url=os.environ["OPENAI_BASE_URL"], max_retries=0, timeout=60
)
app = FastAPI()


class Prompt(BaseModel):
    prompt: str


@app.post("/task")
async def task(body: Prompt) -> dict[str, str | None]:
    response = await client.chat.completions.create(
        model="bench-model", messages=[{"role": "user", "content": body.prompt}]
    )
    return {"answer": response.choices[0].message.content}


@app.post("/stream")
async def stream(body: Prompt) -> StreamingResponse:
    """The same, streamed: each piece forwarded as a Server-Sent Event as it comes."""
    chunks = await client.chat.completions.create(
        model="bench-model",
        messages=[{"role": "user", "content": body.prompt}],
        stream=True,
        stream_options={"include_usage": True},
    )

    async def events() -> AsyncIterator[str]:
        async for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                yield f"event: delta\ndata: {json.dumps({'text': chunk.choices[0].delta.content})}\n\n"
        yield "event: done\ndata: {}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
