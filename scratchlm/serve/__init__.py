"""Serving: an OpenAI-compatible HTTP API, a web chat page and a terminal chat.

    text.py      prompts (chat template or plain fallback, trimmed to the context) and streamed text
    batching.py  the engine: concurrent requests share decode steps, each row with its own KV positions
    protocol.py  OpenAI request fields -> checked values; results -> OpenAI response JSON
    api.py       the FastAPI app: routes, Server-Sent Events, limits, errors
    terminal.py  `scratchlm chat`
"""
