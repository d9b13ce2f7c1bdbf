"""Redis client factory (redis-py asyncio)."""

from redis.asyncio import Redis


def make_redis(url: str) -> "Redis":
    """A pooled client with short timeouts: Redis is a cache and throttle, never a blocker."""
    client: Redis = Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=2.0,
        socket_connect_timeout=2.0,
        health_check_interval=30,
    )
    return client
