"""The floor for this stack: FastAPI forwarding the prompt with AsyncOpenAI; no auth, no limits,
no database, no metrics. Served by the same gunicorn + uvicorn-worker as the service."""

from __future__ import annotations

import os

from fastapi import FastAPI
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
