"""`azgpt serve`: a local HTTP API (Ollama- and OpenAI-compatible) and a playground page.

`engine.py` batches concurrent generations (usable without HTTP); `app.py` holds the routes.
Importing this package loads nothing: the model is loaded by `app.serve`.
"""
