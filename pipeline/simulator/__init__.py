from .server import LogEntry, Simulator, running, serve

__all__ = ["LogEntry", "Simulator", "running", "serve"]
