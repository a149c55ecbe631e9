"""The HTTP schemas of ``POST /v1/images/generations`` (OpenAI-images-like),
``POST /v1/captions`` and ``POST /v1/answers``, and their errors.

Request body (JSON)::

    {"prompt": str (required, 1..MAX_PROMPT_CHARS characters),
     "n": 1..8 (default 1)            images for the prompt; image k uses seed + k
     "size": "256x256"                the only size the generator paints
     "response_format": "b64_json"    the only format (PNG, base64)
     "seed": int >= 0 (default 0),   "steps": 1..max_steps (default per strategy),
     "strategy": "mask_predict" | "confidence" | "tlbr" | "random",
     "temperature": 0..100 (default 0 = greedy), "return_ids": bool,
     "timeout_ms": 1..600000 (default: the server's)}

Response: ``{"created": unix seconds, "data": [{"b64_json", "seed", "ids"?}]}``.

``POST /v1/captions`` (an image in, a caption out)::

    {"cluster_ids": [N² ints] (required; the served model's N×N grid, 64 on 8×8; e.g. the "ids"
                               a generation returned),
     "length": 1..18 words (default 12),
     "seed", "steps" (default per strategy, over the caption's words), "strategy",
     "temperature", "timeout_ms": as for images}

Response: ``{"created", "data": [{"ids": [length ints], "text": str, "probs": [length floats]}]}``
(an id of -1 is a word no step decided: the AR orders with fewer steps than words).

``POST /v1/answers`` (a question about an image)::

    {"question": str (required, 1..MAX_PROMPT_CHARS characters),
     "cluster_ids": [64 ints], or for nlvr2 [[64 ints], [64 ints]] (two images),
     "top_k": 1..the head's answers (default min(5, answers)), "timeout_ms"}

Response: ``{"created", "data": [{"answer": str, "score": float}, ...]}``, best first (score: the
sigmoid of the logit for VQA/GQA, the softmax over the two classes for NLVR2).

Errors are OpenAI-shaped: ``{"error": {"message", "type", "param", "code"}}``; a request that
fails validation answers 422 and ``param`` names the offending field (the message starts with
it too). Limits that depend on the server (``max_steps``, the image size) are checked by
:func:`check_against_server` so that they, too, answer 422 naming the field.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..caption_io import DEFAULT_WORDS, MAX_WORDS
from ..grid import MAX_GRID, N_CELLS
from ..strategies import NAMES, check_steps, default_steps

MAX_PROMPT_CHARS = 2000  # captions are cut to 20 tokens anyway; this bounds tokenizer work
MAX_N = 8
MAX_TIMEOUT_MS = 600_000
DEFAULT_TOP_K = 5  # answers returned when top_k is not given (xlx_fast.answer's default too)


class ImageRequest(BaseModel):
    """One generation request; unknown fields are refused (a typo must not pass silently), and
    types are strict, as the engine's are: ``"n": "2"``, ``"n": true``, ``"seed": "5"`` or
    ``"return_ids": "yes"`` answer 422 naming the field instead of being guessed at (an integer
    is still a valid ``temperature``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    n: int = Field(default=1, ge=1, le=MAX_N)
    size: str = "256x256"
    response_format: Literal["b64_json"] = "b64_json"
    seed: int = Field(default=0, ge=0, lt=2**63)
    steps: int | None = Field(default=None, ge=1)
    strategy: Literal[NAMES] = "mask_predict"
    temperature: float = Field(default=0.0, ge=0.0, le=100.0, allow_inf_nan=False)
    return_ids: bool = False
    timeout_ms: int | None = Field(default=None, ge=1, le=MAX_TIMEOUT_MS)
    model: str | None = None  # accepted for OpenAI-client compatibility; one model per server

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt must contain non-blank text")
        return v



class CaptionsRequest(BaseModel):
    """One image to caption (strict, unknown fields refused, as :class:`ImageRequest`). Ids out
    of the server's codebook are :func:`check_caption_against_server`'s (422 ``cluster_ids``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # exactly the served model's cells (its grid's N²): :func:`check_caption_against_server`
    cluster_ids: list[int] = Field(min_length=1, max_length=MAX_GRID * MAX_GRID)
    length: int = Field(default=DEFAULT_WORDS, ge=1, le=MAX_WORDS)
    seed: int = Field(default=0, ge=0, lt=2**63)
    steps: int | None = Field(default=None, ge=1)
    strategy: Literal[NAMES] = "mask_predict"
    temperature: float = Field(default=0.0, ge=0.0, le=100.0, allow_inf_nan=False)
    timeout_ms: int | None = Field(default=None, ge=1, le=MAX_TIMEOUT_MS)
    model: str | None = None


class AnswersRequest(BaseModel):
    """One question about one image (two for nlvr2). ``cluster_ids``' layout depends on the
    server's answer task, so it is checked by :func:`check_answer_against_server`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    question: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    cluster_ids: list
    top_k: int | None = Field(default=None, ge=1)
    timeout_ms: int | None = Field(default=None, ge=1, le=MAX_TIMEOUT_MS)
    model: str | None = None

    @field_validator("question")
    @classmethod
    def _question_has_text(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("question must contain non-blank text")
        return v


class ImageData(BaseModel):
    b64_json: str
    seed: int
    ids: list[int] | None = None


class ImageResponse(BaseModel):
    created: int
    data: list[ImageData]


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` with an OpenAI-shaped body."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type_
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.status}}


def check_against_server(req: ImageRequest, *, image_size: int, max_steps: int,
                         n_cells: int = N_CELLS) -> int:
    """The limits that depend on the server; returns the request's step count. ``n_cells``: the
    served model's cells (N² of its N×N grid): the one-cell-per-step orders' default and the
    most steps confidence/tlbr take.

    Raises :class:`RequestError` (422) naming ``size`` or ``steps``.
    """
    want = f"{image_size}x{image_size}"
    if req.size != want:
        raise RequestError(422, f"size: only {want!r} is supported, got {req.size!r}", param="size")
    steps = req.steps if req.steps is not None else default_steps(req.strategy, n_cells)
    if steps > max_steps:
        raise RequestError(422, f"steps: must be <= {max_steps} on this server, got {steps}",
                           param="steps")
    try:
        return check_steps(req.strategy, steps, n_cells, what="steps:")
    except ValueError as e:
        raise RequestError(422, str(e), param="steps") from None


def _check_ids(ids: list, n_clusters: int, field: str) -> None:
    """``ids`` are ints in [0, n_clusters) (a JSON true/false or 2.0 is not an id)."""
    for i, v in enumerate(ids):
        if isinstance(v, bool) or not isinstance(v, int):
            raise RequestError(422, f"{field}: every id must be an integer, got {_json_kind(v)} at "
                               f"index {i}", param=field)
        if not 0 <= v < n_clusters:
            raise RequestError(422, f"{field}: ids must lie in [0, {n_clusters}) (the server's "
                               f"codebook), got {v} at index {i}", param=field)


def check_caption_against_server(req: CaptionsRequest, *, n_clusters: int, max_steps: int,
                                 n_cells: int = N_CELLS) -> int:
    """The limits that depend on the server; returns the request's step count (its schedule
    runs over the caption's ``length`` words). ``n_cells``: the served model's cells, the ids
    of one image. Raises :class:`RequestError` (422) naming ``cluster_ids`` or ``steps``."""
    if len(req.cluster_ids) != n_cells:
        grid = round(n_cells ** 0.5)
        raise RequestError(422, f"cluster_ids: one image is {n_cells} ids on this server (its "
                           f"model's {grid}×{grid} grid), got {len(req.cluster_ids)}",
                           param="cluster_ids")
    _check_ids(req.cluster_ids, n_clusters, "cluster_ids")
    steps = req.steps if req.steps is not None else default_steps(req.strategy, req.length)
    if steps > max_steps:
        raise RequestError(422, f"steps: must be <= {max_steps} on this server, got {steps}",
                           param="steps")
    try:
        return check_steps(req.strategy, steps, req.length, what="steps:")
    except ValueError as e:
        raise RequestError(422, f"{e} (a caption of {req.length} words)", param="steps") from None


def check_answer_against_server(req: AnswersRequest, *, task: str, images: int, n_clusters: int,
                                n_answers: int) -> tuple[list, int]:
    """``(cluster_ids, top_k)`` for the server's answer model: ``cluster_ids`` 64 ids, or
    ``images`` lists of 64 ids (nlvr2: two images): the answer model reads the default 8×8 grid,
    whatever the painting model's; ``top_k`` at most the head's answers.
    Raises :class:`RequestError` (422) naming ``cluster_ids`` or ``top_k``."""
    ids = req.cluster_ids
    if images == 1:
        if ids and all(isinstance(x, list) for x in ids):
            raise RequestError(422, f"cluster_ids: {task} takes one image, [{N_CELLS} ids], got "
                               f"{len(ids)} lists", param="cluster_ids")
        if len(ids) != N_CELLS:
            raise RequestError(422, f"cluster_ids: one image is {N_CELLS} ids, got {len(ids)}",
                               param="cluster_ids")
        _check_ids(ids, n_clusters, "cluster_ids")
    else:
        if len(ids) != images or not all(isinstance(x, list) for x in ids):
            got = (f"{len(ids)} ids" if ids and not any(isinstance(x, list) for x in ids)
                   else f"{len(ids)} entries")
            raise RequestError(422, f"cluster_ids: {task} takes {images} images, "
                               f"[[{N_CELLS} ids], [{N_CELLS} ids]], got {got}", param="cluster_ids")
        for n, image in enumerate(ids):
            if len(image) != N_CELLS:
                raise RequestError(422, f"cluster_ids: image {n} must be {N_CELLS} ids, got "
                                   f"{len(image)}", param="cluster_ids")
            _check_ids(image, n_clusters, "cluster_ids")
    top_k = req.top_k if req.top_k is not None else min(DEFAULT_TOP_K, n_answers)
    if top_k > n_answers:
        raise RequestError(422, f"top_k: must be <= {n_answers} (the {task} head's answers), "
                           f"got {top_k}", param="top_k")
    return ids, top_k


def validation_error(errors: list[dict]) -> RequestError:
    """A pydantic/FastAPI validation error list → one 422 naming the first bad field."""
    if not errors:
        return RequestError(422, "invalid request body")
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
    field = ".".join(loc) or "body"
    msg = err.get("msg", "invalid value")
    if err.get("type") == "json_invalid":
        return RequestError(422, f"body: not valid JSON ({msg})", param="body")
    if err.get("type") == "model_attributes_type":
        return RequestError(422, "body: must be a JSON object", param="body")
    if str(err.get("type", "")).endswith("_type") and "input" in err:
        # strict types: say what was sent, e.g. "n: Input should be a valid integer, got the
        # string '2'", so the fix (drop the quotes) is obvious
        msg = f"{msg}, got {_json_kind(err['input'])}"
    return RequestError(422, f"{field}: {msg}", param=field)


def _json_kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    return "an array" if isinstance(value, list) else "an object"
