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
