"""The Batch API of the simulator: files, batches and their life, as OpenAI's behave.

Owns: uploaded files (`POST /v1/files`, purpose `batch`), batches (`POST /v1/batches`, get,
list, cancel), validating a file as OpenAI does (each line a POST to the batch's endpoint, one
model, unique custom_ids, at most `batch_max_lines` lines; an upload over `batch_max_bytes` is
refused), answering its lines over time, and the output and error files: output lines in no
particular order, only answered lines in it, no output file at all when none was answered,
expired or cancelled lines in the error file. Never: how one line is answered (the server's
`answer_line`, as the same request online).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..config import SimulatorSettings
from .wire import JSON, error_body

__all__ = ["BatchDesk"]

WINDOW_S = 24 * 3600
ENDPOINT = "/v1/chat/completions"
LIST_LIMIT = 20  # OpenAI's default page of batches

AnswerLine = Callable[[JSON, str, bool], tuple[int, JSON]]  # (a line's body, its batch, a 500?) -> (status, body)


@dataclass
class _File:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def obj(self) -> JSON:
        return {"id": self.id, "object": "file", "bytes": len(self.data), "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed"}


@dataclass
class _Batch:
    id: str
    input_file_id: str
    metadata: dict[str, str] | None
    created_at: int
    status: str = "validating"
    times: dict[str, int] = field(default_factory=dict)  # in_progress_at, completed_at, ...
    total: int = 0
    completed: int = 0
    failed: int = 0
    errors: list[JSON] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    cancel: asyncio.Event = field(default_factory=asyncio.Event)

    def obj(self) -> JSON:
        return {"id": self.id, "object": "batch", "endpoint": ENDPOINT, "input_file_id": self.input_file_id,
                "completion_window": "24h", "status": self.status, "created_at": self.created_at,
                "expires_at": self.created_at + WINDOW_S, "output_file_id": self.output_file_id,
                "error_file_id": self.error_file_id, "metadata": self.metadata,
                "errors": None if self.errors is None else {"object": "list", "data": self.errors},
                "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
                **{name: self.times.get(name) for name in ("in_progress_at", "finalizing_at", "completed_at",
                                                           "failed_at", "expired_at", "cancelling_at", "cancelled_at")}}

    def mark(self, status: str) -> None:
        self.status = status
        self.times[f"{status}_at"] = int(time.time())


def _error(status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(error_body(status, message, param=param), status_code=status, headers=headers)


class BatchDesk:
    """The files and batches of one simulator, answered with `answer_line` under its settings."""

    def __init__(self, settings: Callable[[], SimulatorSettings], answer_line: AnswerLine) -> None:
        self._settings = settings
        self._answer_line = answer_line
        self.files: dict[str, _File] = {}
        self.uploaded: list[_File] = []  # every upload, deleted or not
        self.batches: dict[str, _Batch] = {}
        self.creates_refused = 0
        self.creates_lost = 0
        self._seen: Counter[str] = Counter()  # how often each custom_id came in a batch
        self._tasks: set[asyncio.Task[None]] = set()

    def routes(self) -> list[Route]:
        return [Route("/v1/files", self._upload, methods=["POST"]),
                Route("/v1/files", self._list_files, methods=["GET"]),
                Route("/v1/files/{id}", self._file, methods=["GET"]),
                Route("/v1/files/{id}", self._delete_file, methods=["DELETE"]),
                Route("/v1/files/{id}/content", self._content, methods=["GET"]),
                Route("/v1/batches", self._create, methods=["POST"]),
                Route("/v1/batches", self._list_batches, methods=["GET"]),
                Route("/v1/batches/{id}", self._get, methods=["GET"]),
                Route("/v1/batches/{id}/cancel", self._cancel, methods=["POST"])]

    # --- files ----------------------------------------------------------------------------

    async def _upload(self, request: Request) -> Response:
        form = await request.form(max_part_size=2**31)
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile) or not isinstance(purpose, str):
            return _error(400, "Missing required parameter: 'file' and 'purpose' are required.", "file")
        if purpose != "batch":
            return _error(400, f"Invalid value for 'purpose': {purpose!r}; this server takes 'batch'.", "purpose")
        data = await upload.read()
        if len(data) > self._settings().batch_max_bytes:
            return _error(400, "File is too large.", "file")
        file = _File(f"file-sim{uuid.uuid4().hex[:20]}", upload.filename or "upload.jsonl", purpose, data,
                     int(time.time()))
        self.files[file.id] = file
        self.uploaded.append(file)
        return JSONResponse(file.obj())

    async def _list_files(self, request: Request) -> Response:
        purpose = request.query_params.get("purpose")
        files = [f for f in self.files.values() if purpose is None or f.purpose == purpose]
        return JSONResponse(_page([f.obj() for f in reversed(files)], request, 10_000))

    async def _file(self, request: Request) -> Response:
        file = self.files.get(request.path_params["id"])
        return JSONResponse(file.obj()) if file else _error(404, "No such File object.", "id")

    async def _delete_file(self, request: Request) -> Response:
        file = self.files.pop(request.path_params["id"], None)
        if file is None:
            return _error(404, "No such File object.", "id")
        return JSONResponse({"id": file.id, "object": "file", "deleted": True})

    async def _content(self, request: Request) -> Response:
        file = self.files.get(request.path_params["id"])
        if file is None:
            return _error(404, "No such File object.", "id")
        return Response(file.data, media_type="application/octet-stream")

    # --- batches --------------------------------------------------------------------------

    async def _create(self, request: Request) -> Response:
        settings = self._settings()
        if self.creates_refused < settings.batch_refuse_creates:
            self.creates_refused += 1
            return _error(429, "Too many batch creation requests (simulated).",
                          headers={"retry-after": str(max(1, round(settings.retry_after_s)))})
        body = await request.json()
        file = self.files.get(body.get("input_file_id", ""))
        if file is None:
            return _error(400, "Invalid 'input_file_id': no such file.", "input_file_id")
        if body.get("endpoint") != ENDPOINT or body.get("completion_window") != "24h":
            return _error(400, f"This server takes endpoint {ENDPOINT} and completion_window 24h.", "endpoint")
        metadata = body.get("metadata")
        if metadata is not None and (len(metadata) > 16 or any(len(str(v)) > 512 for v in metadata.values())):
            return _error(400, "Invalid 'metadata': at most 16 keys, values of 512 characters at most.", "metadata")
        batch = _Batch(f"batch_sim{uuid.uuid4().hex[:20]}", file.id, metadata, int(time.time()))
        self.batches[batch.id] = batch
        task = asyncio.create_task(self._run(batch, file.data))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self.creates_lost < settings.batch_lose_creates:
            self.creates_lost += 1
            return _error(500, "The server had an error while processing your request (simulated; the batch exists).")
        return JSONResponse(batch.obj())

    async def _get(self, request: Request) -> Response:
        batch = self.batches.get(request.path_params["id"])
        return JSONResponse(batch.obj()) if batch else _error(404, "No such Batch object.", "id")

    async def _list_batches(self, request: Request) -> Response:
        return JSONResponse(_page([b.obj() for b in reversed(self.batches.values())], request, 100))

    async def _cancel(self, request: Request) -> Response:
        batch = self.batches.get(request.path_params["id"])
        if batch is None:
            return _error(404, "No such Batch object.", "id")
        if batch.status not in ("validating", "in_progress", "finalizing"):
            return _error(409, f"Cannot cancel a batch with status '{batch.status}'.")
        batch.mark("cancelling")
        batch.cancel.set()
        return JSONResponse(batch.obj())

    # --- a batch's life -------------------------------------------------------------------

    async def _run(self, batch: _Batch, data: bytes) -> None:
        settings = self._settings()
        await asyncio.sleep(settings.batch_validating_s)
        lines, errors = _validated(data, settings.batch_max_lines)
        if errors:
            batch.errors = errors
            batch.mark("failed")
            return
        batch.total = len(lines)
        if batch.status == "validating":
            batch.mark("in_progress")
        draws = {line["custom_id"]: self._draws(line["custom_id"]) for line in lines}
        never = {custom_id for custom_id, (expire, _) in draws.items() if expire < settings.batch_expire_share}
        answered: list[JSON] = []
        failed: list[JSON] = []
        started = time.monotonic()
        for i, line in enumerate(lines):
            if batch.cancel.is_set():
                break
            if line["custom_id"] in never:
                continue
            await asyncio.sleep(max(0.0, started + (i + 1) / settings.batch_lines_per_s - time.monotonic()))
            status, body = await asyncio.to_thread(self._line, line, batch.id, draws[line["custom_id"]][1])
            (answered if status == 200 else failed).append(_result(line["custom_id"], status, body))
            batch.completed += status == 200
            batch.failed += status != 200
        ended = {line["custom_id"] for line in lines} - {r["custom_id"] for r in answered + failed}
        code = "batch_cancelled" if batch.cancel.is_set() else "batch_expired"
        failed += [_unfinished(custom_id, code) for custom_id in sorted(ended)]
        random.shuffle(answered)  # output order is not input order
        batch.output_file_id = self._keep(answered, batch.id, "output") if answered else None
        batch.error_file_id = self._keep(failed, batch.id, "error") if failed else None
        if batch.cancel.is_set():
            batch.mark("cancelled")
        elif ended:
            batch.mark("expired")
        else:
            batch.mark("finalizing")
            batch.mark("completed")

    def _draws(self, custom_id: str) -> tuple[float, float]:
        """Seeded draws of whether a line expires and whether it is answered 500: the same for
        the same custom_id the k-th time it comes in a batch, different the next time."""
        k = self._seen[custom_id]
        self._seen[custom_id] += 1
        rng = random.Random(f"{self._settings().seed}:{custom_id}:{k}")
        return rng.random(), rng.random()

    def _line(self, line: JSON, batch_id: str, draw_500: float) -> tuple[int, JSON]:
        return self._answer_line(line["body"], batch_id, draw_500 < self._settings().batch_rate_500)

    def _keep(self, results: list[JSON], batch_id: str, kind: str) -> str:
        data = b"".join(json.dumps(r).encode() + b"\n" for r in results)
        file = _File(f"file-sim{uuid.uuid4().hex[:20]}", f"{batch_id}_{kind}.jsonl", f"batch_{kind}", data,
                     int(time.time()))
        self.files[file.id] = file
        return file.id


def _validated(data: bytes, max_lines: int) -> tuple[list[JSON], list[JSON]]:
    """The lines of a batch input file, or the errors that fail it, as OpenAI reports them."""
    lines: list[JSON] = []
    errors: list[JSON] = []
    seen: set[str] = set()
    models: set[str] = set()
    for number, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
            custom_id, body = line["custom_id"], line["body"]
        except (ValueError, KeyError, TypeError):
            errors.append(_line_error("invalid_json_line", number, "This line is not parseable as valid JSON."))
            continue
        if line.get("method") != "POST" or line.get("url") != ENDPOINT:
            errors.append(_line_error("url_mismatch", number, f"The url of this line is not {ENDPOINT}.", "url"))
        if custom_id in seen:
            errors.append(_line_error("duplicate_custom_id", number, "The custom_id of this line is not unique.",
                                      "custom_id"))
        seen.add(custom_id)
        models.add(str(body.get("model")))
        lines.append(line)
    if len(models) > 1:
        errors.append(_line_error("model_mismatch", None, "A batch input file may name one model only.", "model"))
    if not lines and not errors:
        errors.append(_line_error("empty_file", None, "The batch input file is empty."))
    if len(lines) > max_lines:
        errors.append(_line_error("too_many_tasks", None, f"The batch has {len(lines)} requests; "
                                                          f"at most {max_lines} are allowed."))
    return lines, errors


def _line_error(code: str, line: int | None, message: str, param: str | None = None) -> JSON:
    return {"code": code, "line": line, "message": message, "param": param}


def _result(custom_id: str, status: int, body: JSON) -> JSON:
    return {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": custom_id, "error": None,
            "response": {"status_code": status, "request_id": uuid.uuid4().hex, "body": body}}


def _unfinished(custom_id: str, code: str) -> JSON:
    words = "expired before it was processed" if code == "batch_expired" else "was cancelled"
    return {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": f"This request {words}."}}


def _page(items: list[JSON], request: Request, most: int) -> JSON:
    """One page of a list, newest first, after the id `after`, as OpenAI pages them."""
    after = request.query_params.get("after")
    limit = min(int(request.query_params.get("limit", LIST_LIMIT)), most)
    start = next((i + 1 for i, item in enumerate(items) if item["id"] == after), 0) if after else 0
    page = items[start:start + limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": start + limit < len(items)}
