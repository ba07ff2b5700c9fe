"""An OpenAI-compatible API in front of a tritonserver serving tritonize repositories.

``options`` (how the front is run; imports nothing heavy), ``runner`` (uvicorn, in a thread beside
`tritonize serve`'s server or in the foreground for `tritonize openai`), ``app`` (the FastAPI routes),
``protocol`` (requests, their wire form, errors), ``backend`` (tritonclient's asyncio gRPC streaming),
``catalog`` (models, templates, limits, adapters).
"""
