"""Redis client factory (redis-py asyncio)."""

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


def make_redis(url: str) -> "Redis":
    """A pooled client with short timeouts: Redis is a cache and throttle, never a blocker.

    A dropped connection is retried twice with capped, jittered backoff (a Redis restart costs
    a reconnect, not an error); past that the caller sees the error and answers 503.
    """
    client: Redis = Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=2.0,
        socket_connect_timeout=2.0,
        health_check_interval=30,
        retry=Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.05), retries=2),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    return client
