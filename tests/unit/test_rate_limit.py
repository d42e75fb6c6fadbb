from authz_service.check.rate_limit import RateLimiter


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_a_second_worth_passes_at_once_then_the_rate():
    clock = Clock()
    limiter = RateLimiter(clock=clock)
    verdicts = [limiter.take("k", 5) for _ in range(6)]
    assert [v.allowed for v in verdicts] == [True] * 5 + [False]
    assert [v.remaining for v in verdicts[:5]] == [4, 3, 2, 1, 0]
    clock.now += 0.2  # one token back at 5 per second
    assert limiter.take("k", 5).allowed
    assert not limiter.take("k", 5).allowed


def test_denial_says_when_to_retry_and_headers_describe_the_bucket():
    clock = Clock()
    limiter = RateLimiter(clock=clock)
    limiter.take("k", 1)
    denied = limiter.take("k", 1)
    assert not denied.allowed
    assert denied.retry_after == 1
    assert denied.headers() == {"x-ratelimit-limit": "1", "x-ratelimit-remaining": "0", "x-ratelimit-reset": "1"}


def test_slow_rates_retry_after_whole_seconds():
    limiter = RateLimiter(clock=Clock())
    limiter.take("k", 0.25)
    assert limiter.take("k", 0.25).retry_after == 4


def test_keys_have_separate_buckets():
    limiter = RateLimiter(clock=Clock())
    assert limiter.take("a", 1).allowed
    assert limiter.take("b", 1).allowed
    assert not limiter.take("a", 1).allowed


def test_an_idle_bucket_refills_only_to_its_capacity():
    clock = Clock()
    limiter = RateLimiter(clock=clock)
    limiter.take("k", 2)
    clock.now += 3600
    assert [limiter.take("k", 2).allowed for _ in range(3)] == [True, True, False]


def test_the_number_of_buckets_is_bounded():
    limiter = RateLimiter(clock=Clock(), max_keys=2)
    for key in ("a", "b", "c"):
        limiter.take(key, 1)
    assert limiter.take("a", 1).allowed  # "a" was dropped as least recently used: a fresh bucket
    assert not limiter.take("c", 1).allowed
