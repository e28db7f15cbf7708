"""The run config: pydantic models, YAML loading, `--set` overrides, one-line errors.

Owns: every key a config file may hold, their defaults and ranges. Never: reading the
manifest, the API key's value, or anything over the network.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError
from .objects import is_object_url
from .structured import Mode as StructuredMode
from .structured import SchemaError, json_schema

__all__ = [
    "AuthStyle",
    "InputConfig",
    "FetchConfig",
    "PromptConfig",
    "SimulatorSettings",
    "EndpointConfig",
    "RayConfig",
    "RequestConfig",
    "TokenParam",
    "is_reasoning_model",
    "LimitsConfig",
    "OutputConfig",
    "Price",
    "QualityConfig",
    "RunConfig",
    "load",
    "parse",
    "as_location",
    "Location",
    "fingerprint",
    "fingerprint_changes",
    "one_line",
]

AuthStyle = Literal["bearer", "x-api-key", "x-goog-api-key"]
Rate = float  # a share of requests, 0..1


def _location(value: Any) -> Any:
    """An object-store URL stays a str; anything else is a local path."""
    if isinstance(value, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value):
        if not is_object_url(value):
            raise ValueError(f"{value.split('://', 1)[0]}:// is not a store this reads (s3, gs, az, abfs, abfss)")
        return value
    return Path(value) if isinstance(value, str) else value


# A local path, or the URL of a folder or object in a bucket (s3://, gs://, az://, abfs://, ...).
Location = Annotated[Path | str, BeforeValidator(_location)]


def as_location(text: str) -> Path | str:
    """A command-line argument as a Location; ConfigError (exit 2) for a URL of another kind."""
    try:
        found: Path | str = _location(text)
    except ValueError as exc:
        raise ConfigError(f"{text}: {exc}") from None
    return found


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FetchConfig(_Model):
    """How http(s) images are fetched when they are inlined."""

    per_host: PositiveInt = Field(8, description="requests at once to one host")
    timeout_s: PositiveFloat = Field(20.0, description="for one attempt, connecting to the last byte")
    max_attempts: PositiveInt = Field(3, description="tries of a 429, a 5xx, a timeout or a dropped connection")
    max_bytes: PositiveInt = Field(50_000_000, description="stop reading a body longer than this")
    user_agent: str | None = Field(None, description="a contact added to the User-Agent, e.g. an email or a URL")
    respect_robots: bool = Field(True, description="skip images whose X-Robots-Tag says noai or noimageai")
    per_bucket: PositiveInt = Field(64, description="reads at once from one bucket (s3://, gs://, az:// images)")


class InputConfig(_Model):
    manifest: Location = Field(description="a .csv .tsv .parquet .jsonl .ndjson file, or a folder of images; "
                                           "a path or an s3:// gs:// az:// URL")
    image_column: str = "image"
    id_column: str | None = None
    image_root: Location | None = Field(None, description="relative image paths resolve here; default: the manifest's folder")
    keep_columns: tuple[str, ...] = ()
    remote: Literal["inline", "pass"] = Field(
        "inline", description="http(s) images: fetched and sent as data like local files, or passed to the provider as URLs")
    fetch: FetchConfig = FetchConfig()


class PromptConfig(_Model):
    system: str | None = None
    user: str = "Describe this image."
    detail: Literal["low", "high", "auto"] = "auto"
    max_side: PositiveInt | None = Field(None, description="downscale the longer side to this many px before sending")
    frames: int = Field(1, ge=1, le=64, description="frames of an animation sent, spread over it, as that many images")
    max_image_bytes: PositiveInt = Field(20_000_000, description="an image larger than this is re-encoded or downscaled")
    max_request_bytes: PositiveInt = Field(50_000_000, description="a row whose images are larger as sent is an error")


class SimulatorSettings(_Model):
    """Knobs of the bundled simulator. Fault rates are shares of requests, decided from a
    hash of the request and how often it was seen, so a run is repeatable."""

    latency_s: NonNegativeFloat = 0.0
    requests_per_minute: PositiveInt | None = None
    tokens_per_minute: PositiveInt | None = None
    rate_429: Rate = Field(0.0, ge=0, le=1)
    rate_500: Rate = Field(0.0, ge=0, le=1)
    rate_503: Rate = Field(0.0, ge=0, le=1)
    rate_hang: Rate = Field(0.0, ge=0, le=1)
    rate_malformed: Rate = Field(0.0, ge=0, le=1)
    rate_drop: Rate = Field(0.0, ge=0, le=1)
    rate_invalid_json: Rate = Field(0.0, ge=0, le=1, description="share of structured answers that are not JSON")
    rate_schema_break: Rate = Field(0.0, ge=0, le=1, description="share of structured answers that break the schema")
    rate_empty: Rate = Field(0.0, ge=0, le=1, description="share of prose answers that are empty")
    rate_refusal: Rate = Field(0.0, ge=0, le=1, description="share of answers that are a refusal: in words for prose, "
                                                             "in the refusal field (content null) for a json_schema response_format")
    rate_repeat: Rate = Field(0.0, ge=0, le=1, description="share of prose answers that are one caption, the "
                                                           "same for every image")
    refuse_response_format: Literal["none", "json_schema", "all"] = Field(
        "none", description="answer 400 to response_format json_schema, or to any response_format, as some gateways do")
    limit_mode: Literal["window", "fixed_minute", "bucket"] = Field(
        "window", description="how the limits are enforced: at most limit x window_s / 60 in any sliding window "
                              "(OpenAI, Azure), counts reset at each whole window (fixed_minute: gateways, LiteLLM's "
                              "proxy), or a bucket holding one second of allowance")
    window_s: PositiveFloat | None = Field(
        None, description="the window's length: default 1 s for window (Azure: 1 or 10), 60 s for fixed_minute")
    count_refused: bool = Field(True, description="a refused request counts against the window too, as OpenAI's "
                                                  "does (window and fixed_minute)")
    neighbour_rpm: NonNegativeInt = Field(0, description="requests a minute another client of the key uses")
    neighbour_tpm: NonNegativeInt = Field(0, description="tokens a minute another client of the key uses")
    state_limits: bool = Field(True, description="send x-ratelimit-* headers, and Retry-After with a rate-limit 429")
    retry_after_s: NonNegativeFloat = Field(1.0, description="Retry-After sent with a faulted 429")
    hang_s: PositiveFloat = Field(30.0, description="how long a hung request stays silent")
    download_urls: bool = Field(False, description="fetch http(s) image URLs as OpenAI does, a 400 'Timeout while "
                                                   "downloading' or 'Error while downloading' when one cannot be; "
                                                   "off: they are described unseen")
    batch_validating_s: NonNegativeFloat = Field(0.2, description="how long a new batch stays validating")
    batch_lines_per_s: PositiveFloat = Field(200.0, description="how fast a batch in progress answers its lines")
    batch_expire_share: Rate = Field(0.0, ge=0, le=1, description="share of each batch's lines never answered: "
                                                                   "the batch ends expired, keeping the rest")
    batch_rate_500: Rate = Field(0.0, ge=0, le=1, description="share of batch lines answered 500 in the error file")
    batch_refuse_creates: NonNegativeInt = Field(0, description="the first N batch creations are answered 429 "
                                                                "with Retry-After")
    batch_lose_creates: NonNegativeInt = Field(0, description="the first N batches created are answered 500, as "
                                                              "when the answer is lost: the batch exists")
    batch_max_lines: PositiveInt = Field(50_000, description="lines a batch may hold; more fail its validation")
    batch_max_bytes: PositiveInt = Field(200_000_000, description="bytes an uploaded batch file may hold; a larger "
                                                                  "one is refused with a 400")
    seed: int = 0


def _default_base_url() -> str:
    return os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"


class EndpointConfig(_Model):
    base_url: str = Field(default_factory=_default_base_url)
    api_key_env: str = Field("OPENAI_API_KEY", min_length=1, description="the NAME of the variable holding the key")
    auth: AuthStyle = "bearer"
    headers: dict[str, str] = {}
    timeout_s: PositiveFloat = 120.0
    simulator: SimulatorSettings | None = None
    # this endpoint's own limits; unset ones are the run's (limits:)
    concurrency: PositiveInt | None = None
    requests_per_minute: PositiveInt | None = None
    tokens_per_minute: PositiveInt | None = None

    def limits(self, run: LimitsConfig) -> LimitsConfig:
        """The run's limits with this endpoint's own in their place."""
        own = self.model_dump(include={"concurrency", "requests_per_minute", "tokens_per_minute"}, exclude_none=True)
        return run.model_copy(update=own)


# OpenAI's reasoning models (o1, o3, o4-mini, the gpt-5 family but its chat model), after any
# "provider/" prefix: they refuse max_tokens, and any temperature or top_p but 1.
_REASONING = re.compile(r"(?:.*/)?(?:o[1-9](?:-.*)?|gpt-5(?!-chat)(?:[.-].*)?)")
_REASONING_FIXED = {"temperature": 1.0, "top_p": 1.0}
TokenParam = Literal["auto", "max_tokens", "max_completion_tokens"]


def is_reasoning_model(model: str) -> bool:
    return _REASONING.fullmatch(model) is not None


class RequestConfig(_Model):
    model: str = Field(min_length=1)
    max_tokens: PositiveInt | None = 300
    token_param: TokenParam = Field(
        "auto", description="the body key max_tokens goes out as; auto: max_completion_tokens for reasoning "
                            "models (o1, o3, o4-mini, gpt-5), max_tokens for the rest")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1, le=128)
    stop: str | list[str] | None = Field(None, max_length=4)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, int] | None = None
    user: str | None = None
    stream: bool | None = None
    structured: StructuredMode | None = Field(
        None, description="how output_schema is asked for: json_schema (the default), json_object, or prompt")
    parse_retries: NonNegativeInt = Field(1, description="times an answer that breaks output_schema is asked again")
    extra: dict[str, Any] = {}

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _token_ids_as_text(cls, value: Any) -> Any:
        # YAML reads {50256: -100} with an int key; the wire wants a string key.
        return {str(k): v for k, v in value.items()} if isinstance(value, dict) else value

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, value: dict[str, int] | None) -> dict[str, int] | None:
        for token, bias in (value or {}).items():
            if not -100 <= bias <= 100:
                raise ValueError(f"bias for token {token} must be between -100 and 100, got {bias}")
        return value

    @field_validator("extra")
    @classmethod
    def _extra_is_extra(cls, value: dict[str, Any]) -> dict[str, Any]:
        # a field passed through here would slip past the checks, the limits and the budget
        for key in value:
            if key in cls.model_fields or key in ("messages", "stream_options", "max_completion_tokens"):
                raise ValueError(f"{key!r} has its own key: set request.{key}" if key in cls.model_fields
                                 else f"{key!r} is built by the pipeline")
        return value

    @property
    def token_key(self) -> str:
        """The body key that carries max_tokens."""
        if self.token_param != "auto":
            return self.token_param
        return "max_completion_tokens" if is_reasoning_model(self.model) else "max_tokens"

    def set_fields(self) -> dict[str, Any]:
        """The optional body fields the config sets; unset ones never reach the wire."""
        body = self.model_dump(exclude={"model", "max_tokens", "token_param", "extra", "structured", "parse_retries"},
                               exclude_none=True)
        if self.max_tokens is not None:
            body[self.token_key] = self.max_tokens
        return body

    @property
    def choices(self) -> int:
        return self.n or 1


class LimitsConfig(_Model):
    concurrency: PositiveInt = 16
    requests_per_minute: PositiveInt | None = None
    tokens_per_minute: PositiveInt | None = None
    max_attempts: PositiveInt = 6
    max_cost_usd: PositiveFloat | None = Field(
        None, description="the output directory's budget, earlier runs included: no request starts that could pass it")


class OutputConfig(_Model):
    dir: Location = Path("out/run")
    journal_dir: Path | None = Field(None, description="with output.dir in a bucket: where the journal and lock "
                                                       "live; default: a folder of the user's cache for that URL")
    journal: bool = Field(True, description="record each outcome in a SQLite journal before it counts as "
                                            "done; off only to measure what durability costs")


class RayConfig(_Model):
    """How a run uses a Ray cluster (engine: ray)."""

    address: str | None = Field(None, description="the cluster to join, as ray.init takes it; default: "
                                                  "$RAY_ADDRESS, else the cluster `ray start` began on this "
                                                  "machine, else a one-machine Ray started for the run")
    http_actors: PositiveInt = Field(2, description="actors sending requests; each endpoint's concurrency is "
                                                    "shared out among them, rounded down")
    prep_tasks: PositiveInt | None = Field(None, description="image preparation tasks at once; default: one "
                                                             "per CPU of the cluster")
    block_rows: PositiveInt = Field(32, description="rows per block handed between stages")


class BatchConfig(_Model):
    """How a run uses the provider's Batch API (engine: batch)."""

    max_requests: PositiveInt = Field(50_000, le=50_000, description="lines in one batch file (OpenAI: 50,000 at most)")
    max_bytes: PositiveInt = Field(200_000_000, le=200_000_000,
                                   description="bytes of one batch file, as its lines are written (OpenAI: 200 MB)")
    poll_s: PositiveFloat = Field(30.0, description="seconds between looks at the batches under way")
    resubmit: NonNegativeInt = Field(2, description="times a row that expired, was cancelled or met a 429 or 5xx "
                                                    "is put in a new batch before it stays a retryable error")
    wait: bool = Field(True, description="wait for the batches and collect them; false (--no-wait): submit "
                                         "and exit, a later run collects")


class Price(_Model):
    """USD per 1M tokens; the batch_ prices are the provider's Batch API's (engine: batch)."""

    input: NonNegativeFloat
    output: NonNegativeFloat
    cached_input: NonNegativeFloat | None = None
    batch_input: NonNegativeFloat | None = None
    batch_output: NonNegativeFloat | None = None
    batch_cached_input: NonNegativeFloat | None = None


# How answers that are refusals begin, in the words vision models use (matched case-blind at the
# start of the answer, so a caption that quotes "sorry" on a sign is not one).
REFUSAL_PATTERNS = (
    r"(i'm|i am|i’m) (sorry|unable|not able)",
    r"i (can't|cannot|can’t|won't|will not) (help|assist|provide|describe|identify|comply|do that|analy[sz]e)",
    r"sorry, (but )?i",
    r"as an ai",
)


class QualityConfig(_Model):
    """Which answers are flagged for a second look (the `flags` column, `annotate report`,
    `annotate view`), and how `annotate run --retry-flagged` asks them again."""

    refusal_patterns: tuple[str, ...] = Field(
        REFUSAL_PATTERNS, description="regular expressions; an answer that begins with a match is a refusal")
    min_chars: NonNegativeInt = Field(10, description="an answer shorter than this is flagged short (prose only)")
    duplicate_share: Rate = Field(
        0.01, ge=0, le=1, description="an answer text given by more than this share of answered rows (and by 3 "
                                      "or more) is flagged duplicate (prose only)")
    retry: dict[str, Any] = Field(
        {}, description="request settings for rows asked again with --retry-flagged, e.g. max_tokens, temperature")

    @field_validator("refusal_patterns")
    @classmethod
    def _compiles(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression ({exc})") from None
        return value


def _reasoning_defaults_only(request: RequestConfig, key: str) -> None:
    """ValueError naming `key` when a reasoning model is given a sampling setting it refuses."""
    if not is_reasoning_model(request.model):
        return
    for name, fixed in _REASONING_FIXED.items():
        value = getattr(request, name)
        if value is not None and value != fixed:
            raise ValueError(f"{key}.{name}: {request.model} is a reasoning model, which takes only "
                             f"{name} {fixed:g} (got {value!r}); remove it")


class RunConfig(_Model):
    input: InputConfig
    prompt: PromptConfig = PromptConfig()
    endpoint: EndpointConfig = Field(default_factory=EndpointConfig)
    endpoints: tuple[EndpointConfig, ...] = Field(
        (), description="several endpoints or keys, each under its own limits, instead of endpoint:")
    engine: Literal["local", "ray", "batch"] = "local"
    ray: RayConfig = RayConfig()
    batch: BatchConfig = BatchConfig()
    request: RequestConfig
    limits: LimitsConfig = LimitsConfig()
    output: OutputConfig = OutputConfig()
    quality: QualityConfig = QualityConfig()
    output_schema: dict[str, Any] | None = Field(
        None, description="{field: type} or a JSON Schema; held as the JSON Schema it stands for")
    pricing: dict[str, Price] = {}
    storage_options: dict[str, str] = Field(
        {}, description="object-store settings the environment cannot say, as Polars takes them (aws_endpoint_url, "
                        "aws_region, ...); keys belong in the environment. Only their names reach _run.json")

    @field_validator("output_schema", mode="before")
    @classmethod
    def _as_json_schema(cls, value: Any) -> Any:
        return None if value is None else json_schema(value)

    @model_validator(mode="after")
    def _one_endpoint_key(self) -> RunConfig:
        if self.endpoints and "endpoint" in self.model_fields_set:
            raise ValueError("endpoint, endpoints: set one of them (endpoints: lists several)")
        return self

    @model_validator(mode="after")
    def _reasoning_defaults_only(self) -> RunConfig:
        _reasoning_defaults_only(self.request, "request")
        return self

    @model_validator(mode="after")
    def _retry_request(self) -> RunConfig:
        self.retried()  # a quality.retry that makes no valid request is an error now, not at --retry-flagged
        return self

    def retried(self) -> RunConfig:
        """This config with quality.retry over its request: how --retry-flagged asks again.
        The model stays: a directory holds the answers of one model."""
        if not self.quality.retry:
            return self
        if "model" in self.quality.retry:
            raise ValueError("quality.retry.model: the model stays the output directory's; use another output dir")
        try:
            request = RequestConfig.model_validate({**self.request.model_dump(exclude_unset=True), **self.quality.retry})
        except ValidationError as exc:
            raise ValueError(f"quality.retry: {one_line(exc)}") from None
        _reasoning_defaults_only(request, "quality.retry")
        return self.model_copy(update={"request": request})

    @property
    def targets(self) -> tuple[EndpointConfig, ...]:
        """The endpoints requests go to."""
        return self.endpoints or (self.endpoint,)

    @property
    def target_limits(self) -> list[LimitsConfig]:
        """Each endpoint's limits: its own where it sets them, else the run's."""
        return [target.limits(self.limits) for target in self.targets]

    @model_validator(mode="after")
    def _schema_settings(self) -> RunConfig:
        if self.request.structured and self.output_schema is None:
            raise ValueError(f"request.structured: {self.request.structured} needs an output_schema")
        if self.output_schema is not None and "response_format" in self.request.extra:
            raise ValueError("request.extra.response_format: output_schema builds it; set request.structured")
        return self


def fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """The settings that change answers. Speed settings (concurrency, limits, timeouts,
    streaming) and how a schema is asked for are left out: they may change freely between runs
    of one output directory, so a gateway that refuses response_format can fall back mid-run
    (and which key carries max_tokens, so a deployment's token_param can be set on resume)."""
    return {
        "input": cfg.input.model_dump(mode="json", include={"image_column", "id_column", "image_root"}),
        # the byte caps only bound what an oversized image becomes; frames counts once it is not 1
        "prompt": cfg.prompt.model_dump(mode="json", exclude={"max_image_bytes", "max_request_bytes",
                                                              *(["frames"] if cfg.prompt.frames == 1 else [])}),
        "request": cfg.request.model_dump(mode="json", exclude={"stream", "structured", "parse_retries",
                                                                "token_param"}),
        "output_schema": cfg.output_schema,
    }


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()} or {prefix: {}}


def fingerprint_changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, one 'key: old -> new' each."""
    old, new = _flat(before), _flat(after)
    return [f"{key.rstrip('.')}: {old.get(key)!r} -> {new.get(key)!r}"
            for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]


def one_line(exc: ValidationError) -> str:
    """A pydantic error as one line naming each bad key."""
    problems = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"])
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, SchemaError):  # names the field inside the schema
            problems.append(f"{key}{'.' + cause.path if cause.path else ''}: {cause.message}")
            continue
        message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        if not key:  # a rule across sections: the message names its keys
            problems.append(message.removeprefix("Value error, "))
            continue
        if err["type"] not in ("extra_forbidden", "missing") and err["loc"][0] != "storage_options":  # may be a key
            message += f" (got {err['input']!r})"
        problems.append(f"{key}: {message}")
    return "; ".join(problems)


def _apply(data: dict[str, Any], override: str) -> None:
    path, sep, text = override.partition("=")
    if not sep or not path:
        raise ConfigError(f"--set {override!r}: expected key.path=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {path}: value is not valid YAML ({exc.__class__.__name__})") from None
    *parents, leaf = path.split(".")
    node = data
    for i, key in enumerate(parents):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {path}: {'.'.join(parents[: i + 1])} is not a mapping")
        node = child
    node[leaf] = value


def parse(data: Any, overrides: Sequence[str] = (), output_dir: Path | str | None = None) -> RunConfig:
    """A RunConfig from already-read YAML data, with overrides applied."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("config: the top level must be a mapping of sections (input, prompt, request, ...)")
    for override in overrides:
        _apply(data, override)
    if output_dir is not None:
        data.setdefault("output", {})["dir"] = str(output_dir)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"config: {one_line(exc)}") from None


def load(path: Path | str, overrides: Sequence[str] = (), output_dir: Path | str | None = None) -> RunConfig:
    """Read a YAML config file; every problem is a one-line ConfigError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    return parse(data, overrides, output_dir)
