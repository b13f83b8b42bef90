"""The continuous scheduler's decisions (app/serve/scheduler.py ``schedule`` and ``admit``), with no model and no
thread: every step's prefill within the token budget (a lone request's rows too), the running rows within
max_num_seqs and the cache budget, first come first served, cancelled requests out of the queue."""

from collections import deque

from app.serve.batching import CacheCost
from app.serve.generate import Row, SamplingParams
from app.serve.scheduler import Limits, Request, Status, admit, batch_cache_bytes, schedule


def _req(n: int, prompt: int, max_tokens: int = 8) -> Request:
    return Request([Row(list(range(prompt)), SamplingParams(max_tokens=max_tokens)) for _ in range(n)])


def _steps(waiting: deque, running: list, limits: Limits, end_rows: bool = False, steps: int = 50):
    """Plan and admit until the queue is empty: each step's admitted rows (``end_rows``: the rows of a step end
    before the next one, freeing their places)."""
    out = []
    for _ in range(steps):
        if not waiting:
            break
        plan = schedule(waiting, running, limits)
        admit(plan, waiting, running)
        out.append(plan.rows)
        if end_rows:
            for r in plan.rows:
                r.finish_reason = "length"
    return out


def test_a_lone_request_is_prefilled_within_the_token_budget_over_several_steps():
    """One request of 8 x 100-token prompts (n=8) with a 250-token budget: 2 rows a step (padded 200), 4 steps, in
    order, the request RUNNING from its first admitted row and out of the queue with its last."""
    q = _req(8, 100)
    waiting, running = deque([q]), []
    steps = _steps(waiting, running, Limits(max_num_seqs=32, max_prefill_tokens=250))
    assert [len(s) for s in steps] == [2, 2, 2, 2]
    assert [r for s in steps for r in s] == q.rows
    assert all(len(s) * max(len(r.prompt_ids) for r in s) <= 250 for s in steps)
    assert q.status is Status.RUNNING and q.admitted == 8 and running == [q] and not waiting


def test_a_prompt_over_the_budget_goes_alone_and_nothing_passes_a_request_that_does_not_fit():
    """A 300-token prompt over a 250-token budget is prefilled by itself (else it would never run); the request
    behind it waits for the next step, and so does every request behind that one (first come first served)."""
    big, small, tiny = _req(1, 300), _req(2, 100), _req(1, 1)
    waiting, running = deque([big, small, tiny]), []
    steps = _steps(waiting, running, Limits(max_num_seqs=32, max_prefill_tokens=250))
    assert steps == [big.rows, small.rows, tiny.rows]  # nothing joins the prompt over the budget; then in order


def test_running_rows_stay_within_max_num_seqs():
    waiting, running = deque([_req(3, 4), _req(3, 4)]), []
    first = schedule(waiting, running, Limits(max_num_seqs=4, max_prefill_tokens=4096))
    assert len(first.rows) == 4  # the second request's first row fills the batch; the rest waits
    admit(first, waiting, running)
    assert len(waiting) == 1 and waiting[0].admitted == 1 and waiting[0].status is Status.RUNNING
    assert schedule(waiting, running, Limits(4, 4096)).rows == []  # no place until a row ends
    running[0].rows[0].finish_reason = "stop"
    assert len(schedule(waiting, running, Limits(4, 4096)).rows) == 1


def test_admission_counts_the_cache_the_running_batch_may_grow_to():
    """Each row reserves its fixed state plus per_token x the batch's longest reach (prompt + max_tokens), for every
    row: a burst is admitted only as far as the budget allows, and a lone row over the budget still goes alone."""
    cost = CacheCost(fixed=100, per_token=10)
    rows = [Row([1] * 10, SamplingParams(max_tokens=10)) for _ in range(2)]
    assert batch_cache_bytes(rows, cost) == 2 * (100 + 10 * 20)
    limits = Limits(max_num_seqs=32, max_prefill_tokens=4096, max_cache_bytes=3 * 300, cost=cost)
    burst = [_req(1, 10, max_tokens=10) for _ in range(5)]
    waiting, running = deque(burst), []
    plan = schedule(waiting, running, limits)
    assert len(plan.rows) == 3  # 3 x (100 + 10 x 20) = 900 bytes: the budget
    admit(plan, waiting, running)
    assert schedule(waiting, running, limits).rows == []  # the running batch holds the budget
    # a longer row raises every row's reservation: with 1 running, a 40-token one does not fit beside it
    waiting, running = deque([_req(1, 10, 10), _req(1, 30, 10)]), []
    first = schedule(waiting, running, limits)
    assert len(first.rows) == 1  # 2 x (100 + 10 x 40) = 1000 > 900
    admit(first, waiting, running)
    alone = deque([_req(1, 200, 10)])  # 100 + 10 x 210 > 900, but nothing runs
    assert len(schedule(alone, [], limits).rows) == 1


def test_cancelled_requests_are_planned_out_and_do_not_block_the_queue():
    """A waiting request whose client went away does not take rows, is in the plan's cancellations, and the one
    behind it is admitted; a running request with a cancelled row is cancelled as a whole."""
    gone, nxt, run = _req(2, 5), _req(1, 5), _req(1, 5)
    waiting, running = deque([run]), []
    admit(schedule(waiting, running, Limits(8, 64)), waiting, running)
    for r in gone.rows:
        r.cancelled = True
    waiting.extend([gone, nxt])
    run.rows[0].cancelled = True
    plan = schedule(waiting, running, Limits(8, 64))
    assert plan.rows == nxt.rows and set(map(id, plan.cancel)) == {id(gone), id(run)}
