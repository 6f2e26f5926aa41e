"""A whole submission as one Redis script call: RQ's job hash, queue push and queue registry, as
RQ's own enqueue writes them, plus our seen-marker, listing index, `queued` event and the wake-up of idle workers.

RQ's enqueue builds a `Job` object, serializes it and records a dozen commands; on the hot path
of `POST /generate` that and parsing a MULTI/EXEC's replies cost more than everything else in the
request. Here RQ's write for a queue is recorded once (on a pipeline that is never executed) and
only what differs between jobs is filled in: the id, the time stamps, the arguments and the meta.
A script runs atomically, like MULTI/EXEC, but it is one command with one reply. Every
submission goes this way: `POST /generate` on the asyncio client, variations and the OpenAI routes
on the blocking one (a variations job's input image is written just before, in the same round trip).
`tests/unit/test_submit.py` checks the result against RQ's own enqueue, field by field.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import uuid
import zlib
from typing import Any

from rq import Queue
from rq.utils import utcformat

from app.core import events
from app.core.config import Settings
from app.core.jobs import TASK_GENERATE, WAKE_MAXLEN, GenerationParams
from app.core.queue import SERIALIZER, enqueue_task

# KEYS: rq:queues, the job's queue, the job's hash, seen marker, listing index, event stream, the
#       model's wake stream, the owner's waiting set, then every queue of the model (their lengths
#       come back)
# ARGV: job id, seen TTL, index score, `queued` event JSON, event TTL, event stream length bound,
#       wake stream length bound, the owner's bound on waiting jobs (0: none), RQ's job key prefix,
#       the hash fields every job of the queue shares (a JSON list of field/value pairs, packed
#       once per queue), the owner ("" without keys: the seen marker's value), the bound on the
#       model's waiting jobs (`IMAGEGEN_MAX_QUEUE`; 0: none), then the job's own field/value pairs
# The model's bound is checked here, against the lengths of all its queues read in the same
# atomic call: checked by the API against a count read earlier, concurrent submissions (one
# process's batch, or several processes) each saw room and all went in. When the queues hold the
# bound or more, the script answers an error (IMAGEGEN_QUEUE_FULL and the count) and writes nothing.
# Listing entries older than the seen marker's TTL name jobs that are gone for certain: each
# submission drops them from its index (listing drops expired ones too, but only for a caller who
# lists; an owner who never does kept every entry for ever), and the index itself expires with
# its newest job's marker (a key no longer used kept its last week of entries for ever). A job
# that exists already is not written again: a call resent after a lost connection (see
# `app.core.queue.connect`) must not queue the job twice.
# An owner's waiting set holds the ids of its jobs that may still be waiting; nothing else takes
# them out. Only when it is full are they checked, oldest first, and those no longer `queued`
# (started, ended, canceled, expired) dropped until there is room; if there is none, the script
# answers an error (IMAGEGEN_OWNER_FULL and the count) and writes nothing.
SCRIPT = """
local lengths = {}
local queued = 0
for i = 9, #KEYS do
  lengths[#lengths + 1] = redis.call('LLEN', KEYS[i])
  queued = queued + lengths[#lengths]
end
if redis.call('EXISTS', KEYS[3]) == 0 then
  local limit = tonumber(ARGV[12])
  if limit > 0 and queued >= limit then
    return redis.error_reply('IMAGEGEN_QUEUE_FULL ' .. queued)
  end
  local bound = tonumber(ARGV[8])
  if bound > 0 then
    local waiting = redis.call('ZCARD', KEYS[8])
    if waiting >= bound then
      for _, id in ipairs(redis.call('ZRANGE', KEYS[8], 0, -1)) do
        if redis.call('HGET', ARGV[9] .. id, 'status') ~= 'queued' then
          redis.call('ZREM', KEYS[8], id)
          waiting = waiting - 1
          if waiting < bound then break end
        end
      end
      if waiting >= bound then
        return redis.error_reply('IMAGEGEN_OWNER_FULL ' .. waiting)
      end
    end
    redis.call('ZADD', KEYS[8], ARGV[3], ARGV[1])
    redis.call('EXPIRE', KEYS[8], ARGV[2])
  end
  redis.call('SADD', KEYS[1], KEYS[2])
  redis.call('HSET', KEYS[3], unpack(cjson.decode(ARGV[10])))
  redis.call('HSET', KEYS[3], unpack(ARGV, 13))
  local length = redis.call('RPUSH', KEYS[2], ARGV[1])
  for i = 9, #KEYS do
    if KEYS[i] == KEYS[2] then lengths[i - 8] = length end
  end
  redis.call('SET', KEYS[4], ARGV[11], 'EX', ARGV[2])
  redis.call('ZADD', KEYS[5], ARGV[3], ARGV[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', '(' .. (tonumber(ARGV[3]) - tonumber(ARGV[2])))
  redis.call('EXPIRE', KEYS[5], ARGV[2])
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[6], '*', 'data', ARGV[4])
  redis.call('EXPIRE', KEYS[6], ARGV[5])
  redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[7], '*', 'job', ARGV[1])
end
return lengths
"""
OWNER_FULL = "IMAGEGEN_OWNER_FULL"  # the script's error when the owner's bound is reached
QUEUE_FULL = "IMAGEGEN_QUEUE_FULL"  # the script's error when the model's queues hold their bound
OWNER_QUEUED_PREFIX = "imagegen:queued:"  # + owner: the owner's waiting set (see SCRIPT)
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()  # what EVALSHA names it by
PER_JOB = ("created_at", "enqueued_at", "data", "meta")  # the hash fields that differ between jobs


class JobHash:
    """RQ's hash for the jobs of one task on one queue, taken from a recording of RQ's own enqueue
    (the task's arguments are replaced per job)."""

    def __init__(self, queue: Queue, settings: Settings, task: str = TASK_GENERATE) -> None:
        self.queue = queue
        pipe = queue.connection.pipeline()
        pipe.multi()  # recorded, never executed (RQ reads the server version once, on the Queue)
        job_id = str(uuid.uuid4())
        enqueue_task(queue, GenerationParams(prompt="-"), settings, job_id=job_id, pipeline=pipe, task=task)
        stack = [args for args, _ in pipe.command_stack]
        pipe.reset()
        names = [str(c[0]) for c in stack]
        if names != ["SADD", "HSET", "HSET", "RPUSH"]:
            raise RuntimeError(f"RQ's enqueue now writes {names}; imagegen copies SADD, HSET, HSET, RPUSH")
        pairs = stack[2][2:]
        recorded = dict(zip(pairs[::2], pairs[1::2], strict=True))
        self.func, self.instance, self.args, _ = SERIALIZER.loads(zlib.decompress(recorded["data"]))
        fixed: list[str] = []
        for name, value in recorded.items():
            if name not in PER_JOB:
                fixed += [name, str(getattr(value, "value", value))]  # RQ's status enum as its text
        self.fixed = json.dumps(fixed)

    def fields(self, params: dict[str, Any], meta: dict[str, Any], created: datetime.datetime) -> list[Any]:
        """The job's own hash fields, as field/value pairs (the rest are in `fixed`)."""
        stamp = utcformat(created)
        data = zlib.compress(SERIALIZER.dumps((self.func, self.instance, self.args, {"params": params})))
        out = ["created_at", stamp, "enqueued_at", stamp, "data", data]
        if meta:
            out += ["meta", SERIALIZER.dumps(meta)]
        return out


def script_args(
    job_hash: JobHash,
    job_id: str,
    params: dict[str, Any],
    meta: dict[str, Any],
    created: datetime.datetime,
    *,
    seen_key: str,
    seen_ttl: int,
    index_key: str,
    queued_event: str,
    event_ttl: int,
    wake_stream: str,
    model_queue_keys: list[str],
    owner: str | None = None,
    max_queued: int = 0,
    max_queue: int = 0,
) -> list[Any]:
    """The arguments after the script's SHA1 in an EVALSHA: key count, keys, then ARGV. `max_queued`
    bounds the owner's waiting jobs, `max_queue` those of all `model_queue_keys` together (0: no bound)."""
    queue = job_hash.queue
    keys = [
        queue.redis_queues_keys,
        queue.key,
        queue.job_class.key_for(job_id),
        seen_key,
        index_key,
        events.stream_key(job_id),
        wake_stream,
        OWNER_QUEUED_PREFIX + (owner or ""),
        *model_queue_keys,
    ]
    bound = max_queued if owner is not None else 0
    argv = [job_id, seen_ttl, created.timestamp(), queued_event, event_ttl, events.STREAM_MAXLEN, WAKE_MAXLEN]
    argv += [bound, queue.job_class.redis_job_namespace_prefix, job_hash.fixed, owner or "", max_queue]
    return [len(keys), *keys, *argv, *job_hash.fields(params, meta, created)]
