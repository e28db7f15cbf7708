"""The bundled OpenAI-compatible simulator: a provider's checks, limits and answers on 127.0.0.1.

Owns: `server` (the HTTP app, faults, the request log), `answers` (what a request asks and
what is answered), `meters` (the providers' rate-limit windows). Never: the client code it
tests; it shares only the config models and the image-token rules.
"""

from .server import LogEntry, Simulator, running, serve

__all__ = ["LogEntry", "Simulator", "running", "serve"]
