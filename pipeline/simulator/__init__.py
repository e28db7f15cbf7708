"""The bundled OpenAI-compatible simulator: a provider's checks, limits and answers on 127.0.0.1.

Owns: `server` (the HTTP app, faults, the request log), `request` (checks, and what a request
asks), `image_facts`, `answers` (the texts and usage), `wire` (the bodies sent back), `meters`
(the providers' rate-limit windows). Never: the client code it tests; it shares only the
config models and the image-token rules.
"""

from .server import LogEntry, Simulator, running, serve

__all__ = ["LogEntry", "Simulator", "running", "serve"]
