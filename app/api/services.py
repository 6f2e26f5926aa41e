"""The job service: submit, look up, cancel, wait for and present jobs. Routes stay thin."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import math
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import Queue
from rq.exceptions import DeserializationError, InvalidJobOperation
from rq.job import Job
from rq.registry import CanceledJobRegistry
from sse_starlette.sse import AppStatus

from app.api.schemas import ImageRef, JobErrorInfo, JobList, JobView, Progress, Timings
from app.core import events, metrics
from app.core.catalog import count_live, live_on_queue, model_of_queue, served_models
from app.core.config import Settings
from app.core.enqueue import OWNER_FULL, QUEUE_FULL, SCRIPT, SCRIPT_SHA, JobHash, script_args
from app.core.errors import (
    ConflictError,
    GoneError,
    InvalidRequestError,
    NotFoundError,
    RateLimitedError,
    UnavailableError,
)
from app.core.events import EventType, JobEvent
from app.core.jobs import (
    MAX_SEED,
    MODELS_KEY,
    TASK_GENERATE,
    ErrorCode,
    GenerationParams,
    JobStatus,
    ModelInfo,
    Priority,
    cancel_key,
    parse_job_id,
    status_from_rq,
    steptime_key,
    wake,
    wake_key,
)
from app.core.queue import DESCRIPTIONS, SERIALIZER, fetch_job, get_queues
from app.core.variations import input_key

SEEN_PREFIX = "imagegen:seen:"  # marks ids we issued, so an expired job answers 410, not 404
SEEN_GRACE = 7 * 86400
INDEX_KEY = "imagegen:index"  # sorted set: job id -> created time (for listing)
log = logging.getLogger(__name__)
IDEMPOTENCY_PREFIX = "imagegen:idem:"
IDEMPOTENCY_TTL = 86400
# Frees an Idempotency-Key whose request failed before its job was written (a 4xx, a full queue),
# so that a retry is answered anew; never once the job exists.
# ARGV[1]: the claim's "<body hash>:<job id>:" (its time follows).
RELEASE_KEY_SCRIPT = """
local claim = redis.call('GET', KEYS[1])
if redis.call('EXISTS', KEYS[2]) == 0 and claim and string.sub(claim, 1, #ARGV[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
TAKE_OVER_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
"""
STALE_CLAIM = 30.0  # seconds after which a claimed Idempotency-Key with no job may be taken over
STATE_TTL = 1.0  # seconds `submit` trusts its copy of a model's queue state and defaults
BLOCK_MS = 2000  # one blocking stream read; below the Redis client's socket timeout
OUTAGE_PAUSE = 0.5  # seconds between a wait's tries while Redis is unreachable
POLL_MS = 500  # between non-blocking stream reads, once `max_streams` reads block (see `JobService._xread`)
ETA_LOOKAHEAD = 100  # jobs ahead whose parameters are read for an ETA; the rest are extrapolated

ImageUrl = Callable[[str, int], str]


@dataclass
class QueueReads:
    """What the queued jobs of one answer (a listing's page) read of the queues, read once: a page
    of 100 queued jobs read each queue's head, the jobs in it and the workers 100 times."""

    heads: dict[str, list[str]] = field(default_factory=dict)  # queue key -> its first ids
    lengths: dict[str, int] = field(default_factory=dict)  # queue key -> its length
    running: dict[tuple[str, ...], list[str]] = field(default_factory=dict)  # a model's queues -> started ids
    work: dict[str, float | None] = field(default_factory=dict)  # job id -> seconds of sampling left (None: gone)
    live: dict[str, int] = field(default_factory=dict)  # first queue -> live workers
    times: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> measured seconds per step, by size


def _stream_order(ident: str) -> tuple[int, int]:
    ms, _, seq = ident.partition("-")
    return int(ms), int(seq or 0)


def _job_params(job: Job) -> dict[str, Any]:
    """A job's parameters, resolved by its worker or as submitted; {} for anything else (a job
    planted by another producer may carry any JSON there)."""
    try:
        kwargs = job.kwargs if isinstance(job.kwargs, dict) else {}
    except DeserializationError:  # queued with another serializer (RQ's pickle): no parameters to show
        kwargs = {}
    for params in ((job.meta or {}).get("params"), kwargs.get("params")):
        if isinstance(params, dict) and params:
            return params
    return {}


def _float(text: str) -> float:
    """A claim's time; 0 for a claim written without one (before claims carried it)."""
    try:
        return float(text)
    except ValueError:
        return 0.0


def _int(value: Any) -> int:
    """A parameter as an int for estimates; 0 when it is missing or not a number."""
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


ROUTES_OF_TASKS = {task: f"POST /{name}" for task, name in DESCRIPTIONS.items()}  # their submission routes


def _idempotency_key(key: str, owner: str | None) -> str:
    # Scoped per API key: one client's key can never return another client's job.
    return IDEMPOTENCY_PREFIX + hashlib.sha256(f"{owner}:{key}".encode()).hexdigest()


@dataclass
class _QueueState:
    """What `submit` knows of a model's queues: re-read at most every STATE_TTL seconds, and its
    lengths refreshed by every write, whose script call reads them back. It gives ETAs and a full
    queue's Retry-After; the bound on waiting jobs is checked in the script call itself."""

    read_at: float
    lengths: list[int]  # waiting jobs per priority, highest first
    workers: int  # live ones (see app.core.catalog); ETAs need one, and a Retry-After counts at least one
    steptimes: dict[str, float]
    info: ModelInfo | None  # the defaults its workers publish (None before any worker started)

    def per_job(self) -> float:
        """Seconds of sampling a job of the model's default steps takes, from measured step times
        (1 s before any was measured)."""
        times = self.steptimes
        steps = self.info.num_inference_steps if self.info and self.info.num_inference_steps else 25
        return sum(times.values()) / len(times) * steps if times else 1.0


@dataclass
class _Admitted:
    """A request filled from its model's defaults: what a write needs (its bounds are checked by the write)."""

    params: GenerationParams
    params_json: dict[str, Any]  # `params` as the job's arguments carry them
    meta: dict[str, Any]
    rank: int  # index of its priority
    own_work: float | None  # seconds of sampling this job needs, from measured step times
    state: _QueueState

    def place(self, lengths: list[Any]) -> tuple[int, float | None]:
        """(queue position, ETA) from the queue lengths read back at the end of the job's write:
        the position is exact at that moment; the jobs ahead are counted as if they were like this
        one (GET /jobs/{id} reads them)."""
        self.state.lengths = [int(x) for x in lengths]
        position = sum(self.state.lengths[: self.rank + 1]) - 1
        workers = self.state.workers
        # The jobs ahead share the live workers; this one then runs on one of them.
        eta = None if self.own_work is None or not workers else self.own_work * (1 + position / workers)
        return position, eta


@dataclass
class Placed:
    """A job `submit_async` just queued, with all that its 202 body says (see `JobService.view_placed`)."""

    id: str
    priority: Priority
    created_at: datetime.datetime
    params: dict[str, Any]
    position: int
    eta: float | None


Position = tuple[float, bytes | None]  # a listing cursor: creation time, and the job id when known


def _parse_cursor(cursor: str | None) -> Position | None:
    """A listing cursor's position (see `JobService.list_jobs`), or a 422 for anything else."""
    if cursor is None:
        return None
    text, _, member = cursor.partition(":")
    try:
        score = float(text)
        if not math.isfinite(score):  # Redis takes no NaN, and no page starts at infinity
            raise ValueError(cursor)
    except ValueError:
        score = math.nan
    job_id = parse_job_id(member) if member else None  # canonical: members compare as bytes
    if math.isnan(score) or (member and job_id is None):
        msg = "not a cursor returned by this endpoint"
        details = [{"loc": ["query", "cursor"], "msg": msg, "type": "value_error"}]  # as every other 422 has
        raise InvalidRequestError(f"cursor: {msg}", code="validation_error", details=details)
    return score, job_id.encode() if job_id else None


def _after(redis: Redis, key: str, position: Position | None, count: int) -> list[tuple[bytes, float]]:
    """Up to `count` (member, score) pairs of the index after `position`, newest first: members of
    the same score come in descending byte order, as ZREVRANGEBYSCORE gives them."""
    if position is None:
        return redis.zrevrangebyscore(key, "+inf", "-inf", start=0, num=count, withscores=True)  # type: ignore[return-value]
    score, member = position
    tied: list[tuple[bytes, float]] = []
    if member is not None:  # the rest of its own score first (nearly always none)
        same: list[tuple[bytes, float]] = redis.zrevrangebyscore(key, repr(score), repr(score), withscores=True)  # type: ignore[assignment]
        tied = [pair for pair in same if pair[0] < member][:count]
    if len(tied) == count:
        return tied
    older: list[tuple[bytes, float]] = redis.zrevrangebyscore(  # type: ignore[assignment]
        key, f"({score!r}", "-inf", start=0, num=count - len(tied), withscores=True
    )
    return tied + older


class _Writes:
    """Commands that arrive while the event loop is busy go to Redis together, in one pipeline (one
    round trip); each caller gets its own reply or error. Each submission is one atomic script call
    (see `app.core.enqueue`), so sharing the round trip never splits a job."""

    def __init__(self, aredis: AsyncRedis) -> None:
        self.aredis = aredis
        self.pending: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self.flusher: asyncio.Task[None] | None = None

    async def write(self, *command: Any) -> Any:
        """Execute one command with the others waiting; returns its reply (raises its error)."""
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending.append((command, done))
        if self.flusher is None:
            self.flusher = asyncio.create_task(self._flush())
        return await done

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # one turn of the loop: requests already read join this write
        batch, self.pending, self.flusher = self.pending, [], None
        pipe: Any = self.aredis.pipeline(transaction=False)
        for command, _ in batch:
            pipe.pipeline_execute_command(*command)
        try:
            replies = await pipe.execute(raise_on_error=False)
        except asyncio.CancelledError:
            for _, done in batch:
                done.cancel()
            raise
        except Exception as exc:  # e.g. the connection failed: each caller gets the error
            for _, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        for (_, done), reply in zip(batch, replies, strict=True):
            if done.done():  # its caller went away meanwhile
                continue
            if isinstance(reply, Exception):  # this command failed; the others are unaffected
                done.set_exception(reply)
            else:
                done.set_result(reply)


class JobService:
    def __init__(
        self, settings: Settings, redis: Redis, aredis: AsyncRedis | None = None, watch: AsyncRedis | None = None
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.aredis = aredis
        # Blocking stream reads (SSE, long-polls) hold a connection each for up to BLOCK_MS: they
        # get a client of their own, and at most `max_streams` of them block at once (see `_xread`).
        self.watch = watch or aredis
        self._blocking = 0
        self._writes = _Writes(aredis) if aredis is not None else None
        self.queues = get_queues(redis, settings.model)
        self._other_queues: dict[str, list[Queue]] = {}
        self._job_hashes: dict[tuple[str, str], JobHash] = {}  # per queue name and task
        self._state: dict[str, _QueueState] = {}

    @property
    def event_ttl(self) -> int:
        return self.settings.event_ttl

    @property
    def _seen_ttl(self) -> int:
        return self.event_ttl + SEEN_GRACE

    # -- submit ---------------------------------------------------------------------------
    def route(self, model: str | None) -> str:
        """The model a job goes to: ours by default; one a request names must have a live worker."""
        if model is None or model == self.settings.model:
            return self.settings.model
        served = sorted(served_models(self.redis, self.settings.worker_heartbeat))
        if model not in served:
            message = f"model: {model!r} is not served by any live worker; served: {', '.join(served) or 'none'}"
            raise InvalidRequestError(
                message,
                code="validation_error",
                details=[{"loc": ["body", "model"], "msg": "not served by any live worker", "served": served}],
            )
        return model

    def submit(
        self,
        params: GenerationParams,
        *,
        priority: Priority = Priority.normal,
        webhook: dict[str, Any] | None = None,
        job_id: str | None = None,
        owner: str | None = None,
        max_queued: int = 0,
        model: str | None = None,
        task: str = TASK_GENERATE,
        before: Callable[[Pipeline, str], None] | None = None,
    ) -> Placed:
        """Queue a job of `task` (under `job_id` when an idempotency key reserved one) on the queue of
        `model` (see `route`); `before` writes what the job needs first (the input image of a
        variations job), in the same round trip. `owner` may have at most `max_queued` jobs
        waiting (0: no bound), and the model's queues at most `IMAGEGEN_MAX_QUEUE`, both checked
        in the same script call, atomically (429 past either).

        The write is one script call (see `app.core.enqueue`), as in `submit_async`; a read of
        the queue state (lengths, workers, step times, the model's defaults) goes first when the
        cached one is stale (see `_fresh_state`). The queue position and ETA of the 202 body come
        from the script's reply.
        """
        model = self.route(model)
        self._check_sizes(params)
        state = self._fresh_state(model)
        if state is None:
            with self.redis.pipeline(transaction=False) as pipe:
                self._queue_reads(pipe, model)
                state = self._read_state(model, pipe.execute())
        admitted = self._admit(params, model, state, priority, webhook, owner)
        queue = self.model_queues(model)[admitted.rank]
        job_hash = self._job_hashes.get((queue.name, task)) or self._job_hash(queue, task)
        job_id, created, args = self._script_args(admitted, model, job_id, job_hash, max_queued)
        try:
            try:
                lengths = self._write(job_id, args, before)
            except NoScriptError:  # Redis restarted or its scripts were flushed since the last load
                self.redis.script_load(SCRIPT)
                lengths = self._write(job_id, args, before)
        except ResponseError as exc:
            raise self._refused(exc, admitted) from None
        position, eta = admitted.place(lengths)
        return Placed(job_id, priority, created, admitted.params_json, position, eta)

    async def submit_async(
        self,
        params: GenerationParams,
        *,
        priority: Priority = Priority.normal,
        webhook: dict[str, Any] | None = None,
        job_id: str | None = None,
        owner: str | None = None,
        max_queued: int = 0,
        model: str | None = None,
    ) -> Placed:
        """`submit` for async routes, on the asyncio client: the write is one script call (see
        `app.core.enqueue`) sharing its round trip with the submissions ready at the same time."""
        assert self.aredis is not None and self._writes is not None
        if model is not None and model != self.settings.model:
            model = await asyncio.to_thread(self.route, model)  # rare: reads the live workers
        model = model or self.settings.model
        self._check_sizes(params)
        state = self._fresh_state(model)
        if state is None:
            read: Any = self.aredis.pipeline(transaction=False)
            self._queue_reads(read, model)
            state = self._read_state(model, await read.execute())
        admitted = self._admit(params, model, state, priority, webhook, owner)
        queue = self.model_queues(model)[admitted.rank]
        job_hash = self._job_hashes.get((queue.name, TASK_GENERATE))
        if job_hash is None:  # the first job on this queue: RQ reads the server's version once
            job_hash = await asyncio.to_thread(self._job_hash, queue, TASK_GENERATE)
        job_id, created, args = self._script_args(admitted, model, job_id, job_hash, max_queued)
        try:
            try:
                lengths = await self._writes.write("EVALSHA", SCRIPT_SHA, *args)
            except NoScriptError:  # Redis restarted or its scripts were flushed since the last load
                await self.aredis.script_load(SCRIPT)
                lengths = await self._writes.write("EVALSHA", SCRIPT_SHA, *args)
        except ResponseError as exc:
            raise self._refused(exc, admitted) from None
        position, eta = admitted.place(lengths)
        return Placed(job_id, priority, created, admitted.params_json, position, eta)

    def _write(self, job_id: str, args: list[Any], before: Callable[[Pipeline, str], None] | None) -> Any:
        """`before`'s writes, then the script call, in one round trip; returns the script's reply.
        When the script refuses the job (or is not loaded), the keys `before` wrote are deleted: a
        refused variations request left its upload (up to a few MB) for a day."""
        with self.redis.pipeline(transaction=False) as pipe:
            if before is not None:
                before(pipe, job_id)
            written = [command[1] for command, _ in pipe.command_stack]
            pipe.evalsha(SCRIPT_SHA, *args)
            replies = pipe.execute(raise_on_error=False)
        if isinstance(replies[-1], Exception) and written:
            self.redis.delete(*written)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies[-1]

    @staticmethod
    def _refused(exc: ResponseError, admitted: _Admitted) -> Exception:
        """The error to raise for the script's error reply: a 429 when the model's queues or the
        owner have their bound of jobs waiting (nothing was written), else the reply itself."""
        state = admitted.state
        queue_full = re.search(QUEUE_FULL + r" (\d+)", str(exc))  # a pipeline puts its own words first
        if queue_full is not None:
            waiting = int(queue_full.group(1))
            # Roughly when a tenth of the backlog, and at least one job, has drained.
            retry_after = max(1, math.ceil(max(1.0, waiting / 10) * state.per_job() / max(1, state.workers)))
            return RateLimitedError(f"the queue is full ({waiting} jobs waiting); retry later", retry_after=retry_after)
        full = re.search(OWNER_FULL + r" (\d+)", str(exc))
        if full is None:
            return exc
        count = full.group(1)
        retry_after = max(1, math.ceil(state.per_job() / max(1, state.workers)))
        return RateLimitedError(
            f"this API key has {count} jobs waiting, as many as it may; retry when some have started",
            retry_after=retry_after,
        )

    def _script_args(
        self, admitted: _Admitted, model: str, job_id: str | None, job_hash: JobHash, max_queued: int = 0
    ) -> tuple[str, datetime.datetime, list[Any]]:
        """The job's id, creation time and the arguments of its script call (after the SHA1)."""
        job_id = job_id or str(uuid.uuid4())
        created = datetime.datetime.now(datetime.UTC)
        total = admitted.params.num_inference_steps or 0
        queued = events.make_event(EventType.queued, job_id, "queued", progress={"step": 0, "total": total})
        args = script_args(
            job_hash,
            job_id,
            admitted.params_json,
            admitted.meta,
            created,
            seen_key=SEEN_PREFIX + job_id,
            seen_ttl=self._seen_ttl,
            index_key=index_key(admitted.meta.get("owner")),
            queued_event=queued.model_dump_json(exclude_none=True),
            event_ttl=self.event_ttl,
            wake_stream=wake_key(model),
            model_queue_keys=[q.key for q in self.model_queues(model)],
            owner=admitted.meta.get("owner"),
            max_queued=max_queued,
            max_queue=self.settings.max_queue,
        )
        return job_id, created, args

    def _job_hash(self, queue: Queue, task: str) -> JobHash:
        job_hash = self._job_hashes[(queue.name, task)] = JobHash(queue, self.settings, task)
        return job_hash

    def _check_sizes(self, params: GenerationParams) -> None:
        s = self.settings
        for name, limit in (("width", s.max_width), ("height", s.max_height)):
            value = getattr(params, name)
            if value is not None and not (s.min_size <= value <= limit):
                raise InvalidRequestError(
                    f"{name}: must be between {s.min_size} and {limit}",
                    code="validation_error",
                    details=[{"loc": ["body", name], "msg": f"must be between {s.min_size} and {limit}"}],
                )

    def _fresh_state(self, model: str) -> _QueueState | None:
        """The cached queue state, or None when it is old and must be re-read. Not for the bound on
        waiting jobs: the script call checks that against the queues as they are (a count read
        before, even just before, let concurrent submissions past it)."""
        state = self._state.get(model)
        if state is None or time.monotonic() - state.read_at > STATE_TTL:
            return None
        return state

    def _queue_reads(self, pipe: Any, model: str) -> None:
        queues = self.model_queues(model)
        for queue in queues:
            pipe.llen(queue.key)
        count_live(pipe, queues[0].name, self.settings.worker_heartbeat)
        pipe.hgetall(steptime_key(model))
        pipe.hget(MODELS_KEY, model)

    def _read_state(self, model: str, replies: list[Any]) -> _QueueState:
        """Digest the replies to `_queue_reads`."""
        *lengths, live, raw_times, raw_info = replies
        times = {k.decode(): float(v) for k, v in raw_times.items()}
        info = ModelInfo.model_validate_json(raw_info) if raw_info else None
        state = _QueueState(time.monotonic(), [int(x) for x in lengths], int(live), times, info)
        self._state[model] = state
        return state

    def _admit(
        self,
        params: GenerationParams,
        model: str,
        state: _QueueState,
        priority: Priority,
        webhook: dict[str, Any] | None,
        owner: str | None,
    ) -> _Admitted:
        """Fill the request from the model's defaults. The bounds on waiting jobs (the model's
        `max_queue`, the owner's `max_queued`) are checked by the script call that writes the job
        (see `_refused`)."""
        info = state.info
        if params.seed is None:
            params = params.model_copy(update={"seed": secrets.randbelow(MAX_SEED + 1)})
        if info is not None:
            params = info.fill(params)
            problem = info.size_problem(params)
            if problem is not None:
                name, msg = problem
                raise InvalidRequestError(
                    f"{name}: {msg}", code="validation_error", details=[{"loc": ["body", name], "msg": msg}]
                )
        meta: dict[str, Any] = {"webhook": webhook} if webhook else {}
        if owner is not None:
            meta["owner"] = owner
        rank = list(Priority).index(priority)
        params_json = params.model_dump(mode="json")
        own_work = self._work(params_json, params.num_inference_steps or 0, state.steptimes)
        return _Admitted(params, params_json, meta, rank, own_work, state)

    def model_queues(self, model: str) -> list[Queue]:
        """A model's queues, built once (a Queue caches the Redis version RQ reads on enqueue)."""
        if model == self.settings.model:
            return self.queues
        if model not in self._other_queues:
            self._other_queues[model] = get_queues(self.redis, model)
        return self._other_queues[model]

    def claim_idempotency_key(
        self, key: str, body_hash: str, owner: str | None = None, task: str = TASK_GENERATE
    ) -> tuple[str, Job | None]:
        """Reserve a job id for `key`. Returns (id, None) when this request owns the key and should
        submit under that id, or (id, job) with the job an earlier identical request made. `task`:
        what this request queues (a key used for another route's request is named as such)."""
        if not key.strip():
            raise InvalidRequestError("Idempotency-Key: must not be empty", code="validation_error")
        job_id = str(uuid.uuid4())
        redis_key = _idempotency_key(key, owner)
        claim = f"{body_hash}:{job_id}:{time.time():.3f}"
        if self.redis.set(redis_key, claim, nx=True, ex=IDEMPOTENCY_TTL):
            return job_id, None
        stored = (self.redis.get(redis_key) or b"").decode()  # type: ignore[union-attr]
        stored_hash, _, rest = stored.partition(":")
        stored_id, _, claimed_at = rest.partition(":")
        if stored_hash != body_hash:
            earlier = fetch_job(self.redis, stored_id) if parse_job_id(stored_id) else None
            if earlier is not None and earlier.func_name != task and earlier.func_name in ROUTES_OF_TASKS:
                raise ConflictError(
                    f"this Idempotency-Key was already used for a {ROUTES_OF_TASKS[earlier.func_name]} request "
                    f"(job {stored_id}); send this request with a key of its own",
                    code="idempotency_conflict",
                )
            raise ConflictError(
                "this Idempotency-Key was already used with a different request body", code="idempotency_conflict"
            )
        deadline = time.monotonic() + 2.0  # the first request may still be enqueueing
        while time.monotonic() < deadline:
            # The marker first: the script writes it with the job, so once it is seen the job was
            # written; a job read missing after it has expired. (Read the other way round, a job
            # written between the two reads looked expired: a 410 for a request made at once.)
            made = self.redis.exists(SEEN_PREFIX + stored_id)
            job = fetch_job(self.redis, stored_id)
            if job is not None:
                return stored_id, job
            if made:  # it was made, and has expired since
                raise GoneError(
                    f"the job made with this Idempotency-Key ({stored_id}) has expired; "
                    "send the request with a new key to make another"
                )
            time.sleep(0.01)
        # No job after a claim this old: its request died between the claim and the write (the API
        # process killed, a cancel that skipped the release). This request takes the key over,
        # atomically, instead of every retry being told "still being processed" for a day.
        if time.time() - _float(claimed_at) > STALE_CLAIM and self.redis.eval(
            TAKE_OVER_SCRIPT, 1, redis_key, stored, claim, IDEMPOTENCY_TTL
        ):
            log.warning("Idempotency-Key claim for job %s was never used; taken over by job %s", stored_id, job_id)
            return job_id, None
        raise UnavailableError("the original request with this Idempotency-Key is still being processed", retry_after=1)

    @contextlib.asynccontextmanager
    async def idempotent(
        self, key: str | None, body_hash: Callable[[], str], owner: str | None = None, task: str = TASK_GENERATE
    ) -> AsyncIterator[tuple[str | None, Job | None]]:
        """Around the code that writes a request's job: claim its Idempotency-Key (when it has one)
        and yield (the job id to submit under, the job an earlier identical request made), both
        None without a key. If that code fails before the job exists (a 4xx, a full queue), the
        key is freed so that a retry is answered anew."""
        if key is None:
            yield None, None
            return
        digest = body_hash()
        claimed = None
        if self._writes is not None and key.strip():
            # The common case, a key not seen before: one SET NX on the asyncio client, sharing its
            # round trip with the other writes in flight (`_Writes`). Through the thread that
            # `claim_idempotency_key` needs (for a repeat's waits) a process took 470 keyed
            # submissions a second against 1,050 without a key.
            fresh = str(uuid.uuid4())
            claim = f"{digest}:{fresh}:{time.time():.3f}"
            if await self._writes.write("SET", _idempotency_key(key, owner), claim, "NX", "EX", IDEMPOTENCY_TTL):
                claimed = fresh
        if claimed is not None:
            job_id, existing = claimed, None
        else:
            job_id, existing = await asyncio.to_thread(self.claim_idempotency_key, key, digest, owner, task)
        try:
            yield job_id, existing
        except BaseException:  # a cancelled request (client gone, shutdown) too
            if existing is None:
                await asyncio.to_thread(self._release_idempotency_key, key, digest, job_id, owner)
            raise

    def _release_idempotency_key(self, key: str, body_hash: str, job_id: str, owner: str | None) -> None:
        """Undo `claim_idempotency_key` for a request that failed before writing job `job_id`."""
        try:
            keys = (_idempotency_key(key, owner), Job.key_for(job_id))
            self.redis.eval(RELEASE_KEY_SCRIPT, 2, *keys, f"{body_hash}:{job_id}:")
        except RedisError:  # the claim then simply lasts; a retry is told the original is pending
            log.warning("could not release an Idempotency-Key after a failed request", exc_info=True)

    # -- look up --------------------------------------------------------------------------
    def get(self, raw_id: str, owner: str | None = None) -> Job:
        """The job, if it exists and (with API keys on) belongs to `owner`; another key's job is a 404."""
        job_id = parse_job_id(raw_id)
        if job_id is None:  # never build a Redis key from arbitrary text
            raise NotFoundError(f"no job {raw_id!r}")
        job = fetch_job(self.redis, job_id)
        if job is not None and owner is not None and (job.meta or {}).get("owner") != owner:
            raise NotFoundError(f"no job {job_id}")
        if job is None:
            # The marker holds the owner: another key's expired job is a 404, as when it existed.
            seen: Any = self.redis.get(SEEN_PREFIX + job_id)
            # "1": a marker written before markers held the owner (they expire within a week).
            if seen is not None and (owner is None or seen.decode() in (owner, "1")):
                raise GoneError(f"job {job_id} has expired and its results were deleted")
            raise NotFoundError(f"no job {job_id}")
        return job

    def status(self, job: Job) -> JobStatus:
        return status_from_rq(job.get_status(refresh=False), job.meta or {})

    # -- cancel ---------------------------------------------------------------------------
    def cancel(self, job: Job) -> tuple[Job, JobEvent | None]:
        """Cancel a job. Returns the job and, when it never started, the `canceled` event."""
        status = self.status(job)
        if status.is_terminal():
            raise ConflictError(f"job {job.id} already ended {status.value}", code="job_finished")
        # The flag reaches a running job at its next step, and a job a worker is just picking up;
        # the wake-up has a batching worker read it now rather than at its next periodic look.
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(cancel_key(job.id), 1, ex=self.event_ttl)
            if (model := model_of_queue(job.origin)) is not None:
                wake(pipe, model, cancel=job.id)
            pipe.execute()
        if status is JobStatus.running:
            return job, None
        # Out of its queue first, atomically: a worker may have just moved it to its own list
        # (taken, not yet started), and canceling it then made two `canceled` ends, the worker's
        # (the flag seen at its start) after ours: two events, webhooks and counts. If a worker
        # has it, the flag stops it as it starts.
        queue_key = f"{Queue.redis_queue_namespace_prefix}{job.origin}"
        if job.get_status(refresh=False) == "queued" and job.origin and not self.redis.lrem(queue_key, 1, job.id):
            return job, None
        try:
            job.cancel()
        except InvalidJobOperation:  # canceled meanwhile by another request
            return job, None
        job.meta["error"] = {"code": ErrorCode.canceled.value, "message": "canceled before it started"}
        job.save_meta()
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.expire(job.key, self.settings.failure_ttl)
            pipe.delete(input_key(job.id))  # a variations job's upload (megabytes), kept for its worker
            metrics.record_job(pipe, JobStatus.canceled.value, 0, {})  # no worker will count it
            # RQ's canceled registry (one entry per job canceled while queued, scored by the time)
            # is cleaned by nothing in RQ: drop the entries whose jobs have expired since.
            canceled = CanceledJobRegistry(job.origin, connection=self.redis)
            pipe.zremrangebyscore(canceled.key, "-inf", f"({time.time() - self.settings.failure_ttl}")
            pipe.execute()
        progress = events.job_progress(job)
        event = events.make_event(EventType.canceled, job.id, "canceled", error=job.meta["error"], progress=progress)
        events.publish(self.redis, event, events.stream_ttl(self.settings, event))
        return fetch_job(self.redis, job.id) or job, event

    # -- wait -----------------------------------------------------------------------------
    async def wait_async(self, job_id: str, timeout: float) -> JobEvent | None:
        """Wait until the job ends or `timeout` seconds pass; returns the terminal event when it was
        read here (None when RQ's status said so, or on time-out). Blocks on the job's end stream,
        which only the terminal event reaches, so its progress never wakes the wait."""
        assert self.aredis is not None
        deadline = time.monotonic() + timeout
        key = events.end_key(job_id)
        # RQ's status is read first and after each quiet block: a job can end without an event
        # (a lost worker's job failed by maintenance).
        while (remaining := deadline - time.monotonic()) > 0 and not AppStatus.should_exit:
            # Shutting down: answer now, with the job as it stands (the client asks the next server).
            try:
                status: Any = await self.aredis.hget(Job.key_for(job_id), "status")
                if status is None or status_from_rq(status.decode(), {}).is_terminal():
                    return None
                result: Any = await self._xread({key: "0"}, 1, max(1, int(min(remaining, 2.0) * 1000)))
            except (RedisConnectionError, RedisTimeoutError):
                # Redis restarting: the job is still there once it is back; only a wait that
                # runs out during the outage says so (the caller answers 503).
                if deadline - time.monotonic() <= OUTAGE_PAUSE:
                    raise
                await asyncio.sleep(OUTAGE_PAUSE)
                continue
            for _, entries in result or []:
                return events.decode(entries)[0][1]
        return None

    async def _xread(self, streams: dict[Any, Any], count: int, block_ms: int) -> Any:
        """XREAD that blocks up to `block_ms` on the watch client while fewer than `max_streams`
        reads block; past that, one read that does not block, on the shared client, and a pause of
        up to POLL_MS when it found nothing. Followers then see events up to POLL_MS later, and no
        number of them can take every connection from submissions (or exhaust the pool: a 503)."""
        assert self.watch is not None and self.aredis is not None
        if self._blocking < self.settings.max_streams:
            self._blocking += 1  # one event loop per process: no lock needed
            try:
                return await self.watch.xread(streams, count=count, block=block_ms)
            finally:
                self._blocking -= 1
        result = await self.aredis.xread(streams, count=count)
        if not result:
            await asyncio.sleep(min(block_ms, POLL_MS) / 1000)
        return result

    async def _ended_by(self, key: str, after: str) -> str | None:
        """The id of the stream's terminal event when it is at or before `after`, else None."""
        assert self.aredis is not None
        newest: Any = await self.aredis.xrevrange(key, count=1)
        if not newest:
            return None
        ident, event = events.decode(newest)[0]
        return ident if event.type.is_terminal() and _stream_order(ident) <= _stream_order(after) else None

    async def seen_the_end(self, job_id: str, after: str) -> bool:
        """Whether a client resuming after stream id `after` already has the job's terminal event."""
        return after != "0" and await self._ended_by(events.stream_key(job_id), after) is not None

    async def stream(self, job_id: str, after: str = "0", stop: Callable[[], bool] | None = None):
        """Yield (stream id, event) from `after` until a terminal event (synthesised if RQ ended the
        job without one, e.g. a lost worker), for Server-Sent Events; or until `stop()` is true
        (the server is shutting down), looked at after each blocking read."""
        assert self.aredis is not None
        key = events.stream_key(job_id)
        # A client resuming after the terminal event was answered 204 already (`seen_the_end`).
        while stop is None or not stop():
            result: Any = await self._xread({key: after}, 100, BLOCK_MS)
            if result:
                for ident, event in events.decode(result[0][1]):
                    after = ident
                    yield ident, event
                    if event.type.is_terminal():
                        return
                continue
            status: Any = await self.aredis.hget(Job.key_for(job_id), "status")
            if status is None:
                return  # expired while we watched
            if status_from_rq(status.decode(), {}).is_terminal():
                last = await self._ended_by(key, after)
                if last is not None:  # its terminal event is already behind `after`
                    return
                job = await asyncio.to_thread(self.get, job_id)
                view = await asyncio.to_thread(self.view, job, lambda i, n: f"/jobs/{i}/images/{n}")
                yield (
                    after,
                    events.make_event(
                        EventType(view.status.value),
                        job_id,
                        view.status.value,
                        progress=view.progress.model_dump(),
                        error=view.error.model_dump() if view.error else None,
                        images=[img.model_dump() for img in view.images] or None,
                    ),
                )
                return

    # -- list -----------------------------------------------------------------------------
    def list_jobs(
        self, image_url: ImageUrl, status: JobStatus | None, limit: int, cursor: str | None, owner: str | None = None
    ) -> JobList:
        """Newest first; `cursor` is the opaque `next_cursor` of the previous page.

        The index is a sorted set scored by creation time; a cursor is the position of the last
        job listed, `<score>:<id>`, in the order the set is read (time, then id, both descending), so
        jobs created in the same microsecond (several API processes) are neither skipped nor repeated
        across pages. A bare `<score>` (the cursors of earlier versions) resumes below that time."""
        key = index_key(owner)
        position = _parse_cursor(cursor)
        queues = QueueReads()  # the page's queued jobs share their reads of the queues (ETAs)
        found: list[JobView] = []
        scanned = 0
        while len(found) < limit and scanned < limit * 20:
            batch = _after(self.redis, key, position, limit)
            if not batch:
                break
            ids = [member.decode() for member, _ in batch]
            jobs = Job.fetch_many(ids, connection=self.redis, serializer=SERIALIZER)
            for (member, score), job in zip(batch, jobs, strict=True):
                scanned += 1
                position = (score, member)
                if job is None:
                    self.redis.zrem(key, member)  # expired
                    continue
                view = self.view(job, image_url, queues)
                if status is None or view.status is status:
                    found.append(view)
                    if len(found) == limit:
                        break
        more = position is not None and bool(_after(self.redis, key, position, 1))
        next_cursor = f"{position[0]!r}:{position[1].decode()}" if more and position and position[1] else None
        return JobList(jobs=found, next_cursor=next_cursor)

    # -- present --------------------------------------------------------------------------
    def view_placed(self, job: Placed) -> JobView:
        """The view of a job `submit_async` just queued: what `view` shows for it, without reading it back."""
        return JobView(
            id=job.id,
            status=JobStatus.queued,
            priority=job.priority,
            created_at=job.created_at,
            started_at=None,
            finished_at=None,
            params=job.params,
            progress=Progress(step=0, total=int(job.params.get("num_inference_steps") or 0)),
            queue_position=job.position,
            eta_seconds=None if job.eta is None else round(job.eta, 3),
            images=[],
            timings=Timings(),
            error=None,
        )

    def view(self, job: Job, image_url: ImageUrl, queues: QueueReads | None = None) -> JobView:
        """The job as GET /jobs/{id} shows it; `queues` carries reads of the queues shared with
        other views (a listing's page), else they are read for this job alone."""
        meta = job.meta or {}
        status = status_from_rq(job.get_status(refresh=False), meta)
        params = _job_params(job)
        total = _int(params.get("num_inference_steps"))
        progress = meta.get("progress") or {"step": 0, "total": total}
        images: list[ImageRef] = []
        error = None
        position = eta = None
        if status is JobStatus.succeeded:
            result = job.return_value(refresh=False) or {}
            images = [ImageRef(url=image_url(job.id, img["index"]), **img) for img in result.get("images", [])]
            progress = {"step": progress.get("total", total), "total": progress.get("total", total)}
        elif status in (JobStatus.failed, JobStatus.canceled):
            error = JobErrorInfo(**meta["error"]) if meta.get("error") else self._rq_failure(job)
        elif status is JobStatus.queued:
            reads = queues or QueueReads()
            position = self.queue_position(job, reads)
            eta = self._eta_queued(job, params, position, reads)
            progress = {"step": 0, "total": progress.get("total", total)}  # re-queued: it starts over
        else:
            eta = self._remaining(job, params, progress.get("step", 0))
        # A job re-queued (its worker lost, or handed back at shutdown) keeps RQ's time stamps of
        # the earlier run: shown only where they belong to the current one.
        started = None if status is JobStatus.queued else job.started_at
        return JobView(
            id=job.id,
            status=status,
            priority=self._priority(job),
            created_at=job.created_at,
            started_at=started,
            finished_at=job.ended_at if status.is_terminal() else None,
            params=params,
            progress=Progress(**progress),
            queue_position=position,
            eta_seconds=None if eta is None else round(eta, 3),
            images=images,
            warnings=meta.get("warnings") or [],
            timings=self._timings(job, meta, started),
            error=error,
        )

    @staticmethod
    def _timings(job: Job, meta: dict[str, Any], started: datetime.datetime | None) -> Timings:
        queue_wait = None
        if job.enqueued_at and started and started >= job.enqueued_at:
            queue_wait = round((started - job.enqueued_at).total_seconds() * 1000, 3)
        return Timings(queue_wait_ms=queue_wait, **(meta.get("timings") or {}))

    def _priority(self, job: Job) -> Priority:
        return next(
            (p for p, q in zip(Priority, self._queues_of(job), strict=True) if q.name == job.origin), Priority.normal
        )

    def _queues_of(self, job: Job) -> list[Queue]:
        """The queues of the model the job was routed to (ours unless the request named another)."""
        model = model_of_queue(job.origin)
        return self.queues if model in (None, self.settings.model) else get_queues(self.redis, model)

    def queue_position(self, job: Job, reads: QueueReads) -> int | None:
        """0 = next to run: every job in higher-priority queues, then those ahead in its own."""
        ahead = 0
        for queue in self._queues_of(job):
            if queue.name == job.origin:
                head = self._head(queue, reads)
                if job.id in head:
                    return ahead + head.index(job.id)
                index = self.redis.lpos(queue.key, job.id)
                return None if index is None else ahead + int(index)  # type: ignore[arg-type]
            if queue.key not in reads.lengths:
                reads.lengths[queue.key] = int(self.redis.llen(queue.key))  # type: ignore[arg-type]
            ahead += reads.lengths[queue.key]
        return None

    def _head(self, queue: Queue, reads: QueueReads) -> list[str]:
        """The first ETA_LOOKAHEAD + 1 ids of a queue, read once per `reads`."""
        if queue.key not in reads.heads:
            ids: Any = self.redis.lrange(queue.key, 0, ETA_LOOKAHEAD)
            reads.heads[queue.key] = [i.decode() for i in ids]
        return reads.heads[queue.key]

    def _steptimes(self, job: Job, reads: QueueReads | None = None) -> dict[str, float]:
        """Measured seconds per step of the model the job was routed to (each model's own: another
        model's ETAs came from the default model's times), read once per `reads`."""
        model = model_of_queue(job.origin) or self.settings.model
        if reads is not None and model in reads.times:
            return reads.times[model]
        raw = self.redis.hgetall(steptime_key(model)) or {}
        times = {k.decode(): float(v) for k, v in raw.items()}  # type: ignore[union-attr]
        if reads is not None:
            reads.times[model] = times
        return times

    def _work(self, params: dict[str, Any], steps_left: int, times: dict[str, float]) -> float | None:
        """Seconds of sampling for `steps_left` steps of a job, from measured per-step times."""
        if not times:
            return None
        w, h = _int(params.get("width")), _int(params.get("height"))
        per_step = times.get(f"{w}x{h}")
        if per_step is None:  # scale the nearest measured size by pixel count
            size, value = min(times.items(), key=lambda kv: abs(_pixels(kv[0]) - w * h))
            per_step = value * (w * h) / max(1, _pixels(size))
        return per_step * steps_left * (_int(params.get("num_images")) or 1)

    def _remaining(self, job: Job, params: dict[str, Any], step: int) -> float | None:
        total = _int(params.get("num_inference_steps"))
        return self._work(params, max(0, total - step), self._steptimes(job))

    def _eta_queued(self, job: Job, params: dict[str, Any], position: int | None, reads: QueueReads) -> float | None:
        times = self._steptimes(job, reads)
        own = self._work(params, _int(params.get("num_inference_steps")), times)
        if own is None or position is None:
            return None
        ahead_ids: list[str] = []
        queues = self._queues_of(job)
        for queue in queues:
            ids = self._head(queue, reads)
            if queue.name == job.origin:
                ahead_ids += ids[: ids.index(job.id)] if job.id in ids else ids
                break
            ahead_ids += ids
        ahead_ids = ahead_ids[:ETA_LOOKAHEAD]
        group = tuple(q.name for q in queues)
        if group not in reads.running:
            reads.running[group] = [jid for q in queues for jid in q.started_job_registry.get_job_ids(cleanup=False)]
        running = reads.running[group]
        # Each job's remaining work is read once per `reads` (a page lists jobs of the same queues).
        unread = [jid for jid in dict.fromkeys(ahead_ids + running) if jid not in reads.work]
        fetched = Job.fetch_many(unread, connection=self.redis, serializer=SERIALIZER)
        for jid, other in zip(unread, fetched, strict=True):
            if other is None:
                reads.work[jid] = None
                continue
            p = _job_params(other)
            step = ((other.meta or {}).get("progress") or {}).get("step", 0)
            reads.work[jid] = self._work(p, _int(p.get("num_inference_steps")) - step, times) or 0.0
        before = 0.0  # the work of the jobs running and waiting ahead, which the live workers share
        seen = 0
        for jid in ahead_ids + running:
            work = reads.work.get(jid)
            if work is not None:
                before += work
                seen += 1
        if position > seen and seen:  # more waiting than we read: extrapolate their average
            before += before / seen * (position - seen)
        if queues[0].name not in reads.live:
            reads.live[queues[0].name] = live_on_queue(self.redis, queues[0].name, self.settings.worker_heartbeat)
        live = reads.live[queues[0].name]
        # This job then runs on one worker: its own work is not shared.
        return own + before / live if live else None  # no live worker: no honest estimate

    @staticmethod
    def _rq_failure(job: Job) -> JobErrorInfo:
        """A failure RQ recorded without our code (worker died, hard timeout): name the cause."""
        result = job.latest_result()
        text = (result.exc_string or "") if result is not None else ""
        if "AbandonedJobError" in text or "terminated unexpectedly" in text:
            return JobErrorInfo(code=ErrorCode.worker_lost.value, message="the worker running this job was lost")
        if "JobTimeoutException" in text:
            return JobErrorInfo(code=ErrorCode.timeout.value, message="the job ran past its time limit")
        return JobErrorInfo(code=ErrorCode.internal_error.value, message="the job failed in the worker")


def index_key(owner: str | None) -> str:
    """Sorted set of job ids by creation time: one for everyone, one per API key."""
    return INDEX_KEY if owner is None else f"{INDEX_KEY}:{owner}"


def _pixels(size: str) -> int:
    w, _, h = size.partition("x")
    return int(w) * int(h)
