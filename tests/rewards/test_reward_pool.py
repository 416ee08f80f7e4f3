"""The reward pool with real worker processes: normal scoring, and functions that raise,
hang, crash or return junk — every batch completes and the pool stays usable."""
from __future__ import annotations

import threading
import time

import pytest

from rewards import RewardItem, RewardPool, summarize

BAD = "tests.rewards.bad_rewards"
TIMEOUT = 1.0


@pytest.fixture(scope="module")
def pool():
    with RewardPool(num_workers=2, timeout_s=TIMEOUT) as p:
        p.score([RewardItem("#### 1", "1", verifier="arith")])   # wait for the workers to start
        yield p


def score_within(pool, items, limit_s: float):
    """Score in a thread so a regression that hangs the pool fails this test within seconds,
    naming the limit (pytest-timeout's suite-wide limit is a last resort of minutes)."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(pool.score(items)), daemon=True)
    t.start()
    t.join(limit_s)
    assert out, f"score() did not return within {limit_s} s"
    return out[0]


def good(n: int) -> list[RewardItem]:
    return [RewardItem(f"{i}+1={i + 1}\n#### {i + 1}", str(i + 1), verifier="arith",
                       components={"format": 0.1}) for i in range(n)]


def test_scores_and_weights(pool):
    items = good(50) + [
        RewardItem("#### 7", "8", verifier="arith", components={"format": 0.1}),
        RewardItem("so 0.5", r"\frac{1}{2}", verifier="math", components={"format": 0.1}),
        RewardItem("#### 12+5*3", "27", {"numbers": [12, 5, 3], "target": 27}, "countdown"),
        RewardItem("x" * 30, "", verifier="format", components={"format": 0.0, f"{BAD}:length_bonus": 2.0}),
    ]
    res = pool.score(items)
    assert len(res) == len(items)
    assert all(r.total == pytest.approx(1.1) and r.components == {"arith": 1.0, "format": 1.0}
               for r in res[:50])
    assert res[50].total == pytest.approx(0.1) and res[50].components["arith"] == 0.0
    assert res[51].components == {"math": 1.0, "format": 0.0}
    assert res[52].total == 1.0
    assert res[53].components == {"format": 0.0, f"{BAD}:length_bonus": pytest.approx(0.3)}
    assert res[53].total == pytest.approx(0.6)
    assert sum(r.errors + r.timeouts for r in res) == 0


def test_raising_and_junk_functions_count_as_errors(pool):
    items = good(3) + [
        RewardItem("#### 1", "1", verifier="arith", components={f"{BAD}:boom": 1.0}),
        RewardItem("#### 1", "1", verifier="arith", components={f"{BAD}:not_a_number": 1.0}),
        RewardItem("#### 1", "1", verifier="arith", components={"no_such_module_xyz:fn": 1.0}),
        RewardItem("#### 1", "1", verifier="countdown"),     # meta lacks numbers
    ]
    res = pool.score(items)
    assert [r.errors for r in res] == [0, 0, 0, 1, 1, 1, 1]
    assert res[3].components == {"arith": 1.0, f"{BAD}:boom": 0.0} and res[3].total == 1.0
    assert "boom: verifier bug" in res[3].error_messages[0]
    assert "ModuleNotFoundError" in res[5].error_messages[0]
    assert "numbers" in res[6].error_messages[0]
    assert pool.score(good(2))[1].total == pytest.approx(1.1)


def test_hanging_function_times_out_without_blocking_the_batch(pool):
    items = good(20)
    items.insert(5, RewardItem("#### 1", "1", verifier="arith", components={f"{BAD}:hang": 1.0}))
    start = time.monotonic()
    res = score_within(pool, items, 30)
    elapsed = time.monotonic() - start
    assert elapsed < TIMEOUT + 3.0, elapsed
    assert res[5].timeouts == 1 and res[5].errors == 0
    assert res[5].components == {"arith": 1.0, f"{BAD}:hang": 0.0}
    assert "timed out" in res[5].error_messages[0]
    assert all(r.total == pytest.approx(1.1) and r.timeouts == 0 for i, r in enumerate(res) if i != 5)
    # the hung worker was replaced: the pool still scores, with all its workers
    after = pool.score(good(40))
    assert all(r.total == pytest.approx(1.1) for r in after)
    assert len(pool._workers) == 2 and all(w.proc.is_alive() for w in pool._workers)


def test_every_worker_hanging_at_once(pool):
    items = [RewardItem("#### 1", "1", {"hang": i % 2 == 0}, f"{BAD}:hang_if_marked") for i in range(6)]
    start = time.monotonic()
    res = score_within(pool, items, 30)
    assert [r.timeouts for r in res] == [1, 0, 1, 0, 1, 0]
    assert [r.total for r in res] == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    # 3 hangs on 2 workers: two rounds of timeouts plus a worker restart, not 6 x timeout
    assert time.monotonic() - start < 3 * TIMEOUT + 6.0


def test_crashing_worker_is_an_error_and_replaced(pool):
    items = good(4) + [RewardItem("#### 1", "1", verifier="arith", components={f"{BAD}:crash": 1.0})] + good(4)
    res = score_within(pool, items, 30)
    assert res[4].errors == 1 and "died" in res[4].error_messages[0]
    assert all(r.total == pytest.approx(1.1) for i, r in enumerate(res) if i != 4)
    assert pool.score(good(3))[0].total == pytest.approx(1.1)


def test_unknown_builtin_name_fails_fast(pool):
    with pytest.raises(KeyError, match="aritm"):
        pool.score([RewardItem("#### 1", "1", verifier="aritm")])


def test_summary_for_logging(pool):
    items = good(3) + [RewardItem("#### 1", "1", verifier="arith", components={f"{BAD}:boom": 1.0})]
    stats = summarize(pool.score(items))
    assert stats["reward/errors"] == 1.0 and stats["reward/timeouts"] == 0.0
    assert stats["reward/arith"] == 1.0 and stats["reward/format"] == 1.0
    assert stats["reward/total"] == pytest.approx((3 * 1.1 + 1.0) / 4)
    assert summarize([]) == {}


def test_close_stops_workers_and_empty_batches():
    p = RewardPool(num_workers=1, timeout_s=2.0, preload=())
    procs = [w.proc for w in p._workers]
    assert p.score([]) == []
    assert p.score([RewardItem("#### 2", "2", verifier="arith")])[0].total == 1.0
    p.close()
    p.close()
    assert not any(proc.is_alive() for proc in procs)
    with pytest.raises(RuntimeError, match="closed"):
        p.score([RewardItem("#### 2", "2", verifier="arith")])
