"""The gateway's OpenAI routes: ``POST /v1/...`` proxied to a model's session, and ``/v1/files`` and ``/v1/batches``."""
