"""The benchmark's interleaved timer: every side timed, in alternating rounds, ordered right."""
import time

from groupnorm.bench.timing import time_interleaved


def test_interleaved_timer_orders_sides_and_takes_enough_runs():
    order = []

    def fast():
        order.append("a")
        time.sleep(0.0005)

    def slow():
        order.append("b")
        time.sleep(0.003)

    t_fast, t_slow = time_interleaved([fast, slow], rounds=4, warmup=1, min_runs=8, budget_s=0.08)
    assert t_fast.runs >= 8 and t_slow.runs >= 8
    assert t_slow.median_s > 2 * t_fast.median_s
    assert t_fast.p20_s <= t_fast.median_s <= t_fast.p80_s
    # alternating rounds: the sides switch at least 2 * rounds - 1 times after the warmup
    switches = sum(1 for u, v in zip(order[2:], order[3:]) if u != v)
    assert switches >= 7


def test_interleaved_timer_with_setups_times_only_the_call():
    """A setup's cost stays out of the timing; each call gets its own setup's result."""
    seen = []

    def slow_setup():
        time.sleep(0.004)
        return len(seen)

    def call(token):
        seen.append(token)
        time.sleep(0.0005)

    (t_call,) = time_interleaved([call], setups=[slow_setup], rounds=2, warmup=1, min_runs=6, budget_s=0.05)
    assert t_call.runs >= 6
    assert t_call.median_s < 0.003   # the 4 ms setup is not in it
    assert seen == list(range(len(seen)))   # one fresh setup per call, in order
