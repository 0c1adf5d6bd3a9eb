"""The benchmark's pure pieces: percentiles, open-loop scheduling and driving, the report's
rendering and the profile summary. Nothing here is timed: the assertions hold on any machine."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random

import pytest
from grpc import StatusCode
from grpc.aio import AioRpcError, Metadata

from tools.bench import dataset, report
from tools.bench.load import Recorder, arrival_offsets, run_closed_loop, run_open_loop


def test_percentile_is_the_nearest_rank_and_always_an_observed_value() -> None:
    values = [float(value) for value in range(1, 101)]
    random.Random(3).shuffle(values)
    assert report.percentile(values, 50) == 50.0
    assert report.percentile(values, 95) == 95.0
    assert report.percentile(values, 99) == 99.0
    assert report.percentile(values, 100) == 100.0
    assert report.percentile([0.5, 0.1, 0.9], 50) == 0.5
    assert report.percentile([7.0], 99) == 7.0
    assert report.percentile([1.0, 2.0], 1) == 1.0
    assert math.isnan(report.percentile([], 50))


@pytest.mark.parametrize("share", [0.0, -1.0, 100.1])
def test_a_percentile_outside_0_to_100_is_refused(share: float) -> None:
    with pytest.raises(ValueError):
        report.percentile([1.0], share)


def test_summary_is_in_milliseconds_and_counts_errors() -> None:
    summary = report.summarise([0.001, 0.002, 0.003, 0.100], {"UNAVAILABLE": 2, "DEADLINE_EXCEEDED": 1})
    assert (summary.count, summary.p50_ms, summary.p99_ms, summary.max_ms) == (4, 2.0, 100.0, 100.0)
    assert summary.mean_ms == pytest.approx(26.5)
    assert summary.error_count == 3
    assert list(summary.errors) == ["DEADLINE_EXCEEDED", "UNAVAILABLE"]


def test_poisson_arrivals_average_the_rate_and_stay_inside_the_run() -> None:
    offsets = arrival_offsets(200, 50, random.Random(7))
    assert offsets == sorted(offsets)
    assert offsets[0] > 0 and offsets[-1] < 50
    assert len(offsets) == pytest.approx(200 * 50, rel=0.05)
    gaps = [later - earlier for earlier, later in itertools.pairwise(offsets)]
    assert len(set(gaps)) > len(gaps) // 2, "exponential gaps, not a fixed beat"


def test_even_arrivals_are_evenly_spaced() -> None:
    offsets = arrival_offsets(4, 2, random.Random(1), poisson=False)
    assert offsets == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75])


def test_arrivals_need_a_positive_rate_and_length() -> None:
    with pytest.raises(ValueError):
        arrival_offsets(0, 10, random.Random(1))
    with pytest.raises(ValueError):
        arrival_offsets(10, 0, random.Random(1))


async def test_open_loop_starts_arrivals_without_waiting_for_earlier_ones() -> None:
    """Ten arrivals 1 ms apart, each taking 50 ms: an open loop has them all in flight at once
    (a closed loop of one would take ten times as long), and a unit's latency runs from its
    scheduled start."""
    release, all_started = asyncio.Event(), asyncio.Event()
    started: list[int] = []

    async def slow(sequence: int) -> None:
        started.append(sequence)
        if len(started) == 10:
            all_started.set()
        await release.wait()

    recorder = Recorder()
    run = asyncio.create_task(run_open_loop(slow, [index * 0.001 for index in range(10)], recorder))
    await asyncio.wait_for(all_started.wait(), timeout=30)
    assert not run.done(), "all ten started while none had finished"
    release.set()
    result = await run
    assert sorted(started) == list(range(10))
    assert (len(recorder.units), result.dropped) == (10, 0)


async def test_open_loop_drops_arrivals_beyond_the_in_flight_limit_and_counts_failures() -> None:
    gate = asyncio.Event()

    async def failing(sequence: int) -> None:
        await gate.wait()
        raise AioRpcError(StatusCode.UNAVAILABLE, Metadata(), Metadata(), "down", "")

    recorder = Recorder()
    run = asyncio.create_task(run_open_loop(failing, [0.0] * 5, recorder, max_in_flight=3))
    await asyncio.sleep(0.05)
    gate.set()
    result = await run
    assert (result.dropped, recorder.failed_units, len(recorder.units)) == (2, 3, 0)


async def test_closed_loop_keeps_exactly_its_concurrency_busy() -> None:
    active = peak = 0

    async def unit(sequence: int) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.005)
        active -= 1

    recorder = Recorder()
    result = await run_closed_loop(unit, 4, 0.1, recorder)
    assert peak == 4
    assert len(recorder.units) >= 4
    assert result.dropped == 0


def _step(name: str, kind: str, completed: int, seconds: float = 10.0) -> report.Step:
    summary = report.summarise([0.010, 0.020, 0.030], {"UNAVAILABLE": 1} if kind == "pos" else None)
    return report.Step(
        name=name,
        kind=kind,
        mode="closed",
        target=8,
        seconds=seconds,
        completed=completed,
        rpcs={"CommitCheque" if kind == "pos" else "Echo": summary},
        unit=summary,
        cpu_percent={"gateway": 95.0} if kind == "pos" else {"echo-server": 80.0},
        notes={"coupon_applied": 3} if kind == "pos" else {},
    )


def test_the_ceiling_is_the_best_echo_step_and_sales_are_a_share_of_it() -> None:
    steps = [_step("echo c=1", "echo", 5_000), _step("echo c=8", "echo", 20_000), _step("closed c=8", "pos", 300)]
    assert report.ceiling(steps) == 2_000.0
    assert report.ratio(steps[2], report.ceiling(steps)) == pytest.approx(0.015)
    assert math.isnan(report.ratio(steps[2], 0.0))


def test_the_markdown_names_every_figure_and_the_json_is_strict() -> None:
    steps = [_step("echo c=8", "echo", 20_000), _step("closed c=8", "pos", 300), _step("idle", "pos", 0)]
    steps[2].rpcs = {"Identify": report.summarise([])}
    found = {"samples": 10, "idle_samples": 2, "packages": [("grpc", 70.0)], "self": [("f (a.py)", 60.0)]}
    profile = {"busiest": "gateway", "services": {"gateway": found, "rules": {"error": "no ptrace"}}}
    meta = {"started": "2026-11-22T20:00:00+00:00", "machine": {"cores": 2}, "note": "busy"}
    text = report.render_markdown(meta, steps, profile)
    assert "**2,000.0 calls/s**" in text
    assert "| closed c=8 | 8 conc. | 30.0 | 1.5% | 20.0 | 30.0 | 30.0 | 30.0 | 1 | 0 |" in text
    assert "| closed c=8 | CommitCheque | 3 | 20.0 | 30.0 | 30.0 | 30.0 | UNAVAILABLE 1 |" in text
    assert "| idle | Identify | 0 | n/a | n/a | n/a | n/a | 0 |" in text
    assert "| 60.0% | `f (a.py)` |" in text
    assert "| 70.0% | `grpc` |" in text
    assert "### rules: no profile (no ptrace)" in text
    assert "- **note**: busy" in text
    record = json.loads(json.dumps(report.to_json(meta, steps, profile), allow_nan=False))
    assert record["echo_ceiling_calls_per_second"] == 2000.0
    assert [step["ratio_to_ceiling"] for step in record["steps"]] == [None, 0.015, 0.0]
    assert record["steps"][2]["rpcs"]["Identify"]["p99_ms"] is None


def test_the_profile_summary_counts_own_and_inclusive_time_and_leaves_idle_out() -> None:
    site = "/work/.venv/lib/python3.11/site-packages"
    collapsed = "\n".join(
        [
            f"main (/work/services/app.py:1);handle (/work/services/app.py:10);encode ({site}/json5/x.py:5) 6",
            f"main (/work/services/app.py:1);handle (/work/services/app.py:12);query ({site}/asyncpg/c.py:7) 3",
            "main (/work/services/app.py:1);select (/usr/lib/python3.11/selectors.py:468) 11",
            "garbage line",
        ]
    )
    found = report.top_frames(collapsed)
    assert (found["samples"], found["idle_samples"]) == (9, 11)
    assert found["self"][0] == ("encode (json5/x.py)", pytest.approx(66.67))
    assert dict(found["inclusive"])["handle (services/app.py)"] == 100.0, "two lines of one function count once"
    assert dict(found["packages"]) == {"json5": pytest.approx(66.67), "asyncpg": pytest.approx(33.33)}


def test_frames_are_named_by_package() -> None:
    assert report.frame_name("run (/usr/lib/python3.11/asyncio/events.py:80)") == ("run (asyncio/events.py)", "stdlib")
    assert report.frame_name("f (/r/.venv/lib/python3.11/site-packages/grpc/aio/_call.py:1)") == (
        "f (grpc/aio/_call.py)",
        "grpc",
    )
    assert report.frame_name("commit (/work/main/services/gateway/service.py:475)") == (
        "commit (services/gateway/service.py)",
        "services",
    )
    assert report.frame_name("<module> (<string>:1)") == ("<module> (<string>)", "<string>")


def test_dataset_identifiers_are_valid_and_distinct() -> None:
    phones = {dataset.phone_of(index) for index in (0, 1, 999_999, 19_999_999)}
    cards = {dataset.card_of(index) for index in (0, 1, 999_999, 19_999_999)}
    assert len(phones) == len(cards) == 4
    assert all(len(phone) == 12 and phone.startswith("+79") for phone in phones)
    assert dataset.rule_count(dataset.program()) == 50
    assert dataset.tier_of(0) == "gold" and dataset.tier_of(4) == "silver" and dataset.tier_of(1) == "basic"


def _sales_step(name: str, completed: int, commit_p99_seconds: float, errors: int = 0) -> report.Step:
    step = _step(name, "pos", completed)
    step.rpcs = {
        "CommitCheque": report.summarise([0.001, commit_p99_seconds], {"UNAVAILABLE": errors} if errors else None),
        "Identify": report.summarise([0.001, 0.003]),
    }
    step.unit = report.summarise([0.01])
    return step


def test_targets_report_the_best_clean_rate_within_the_commit_latency_and_what_was_missed() -> None:
    meta = {"dataset": {"members": 10_000, "accruals_per_second": 5_000.0}}
    echo = _step("echo c=8", "echo", 20_000)  # a 2,000 calls/s ceiling
    steps = [echo, _sales_step("open 20/s", 200, 0.030), _sales_step("open 40/s", 400, 0.045)]
    steps.append(_sales_step("open 80/s", 800, 0.020, errors=3))
    rows = {goal.split(" ")[0]: (measured, verdict) for goal, measured, verdict in report.targets(meta, steps)}
    assert rows["sales/s"] == ("40.0 sales/s (2.00% of 2,000) at open 40/s, commit p99 45.0 ms", "missed (7.5x off)")
    assert rows["Identify"][1] == "met; the dataset is smaller than 1,000,000"
    assert rows["1,000,000-account"][1] == "missed (1.7x off)"

    slow = [echo, _sales_step("closed c=8", 300, 0.100)]
    measured, verdict = report.targets({}, slow)[0][1:]
    assert "lowest 100.0 ms at closed c=8" in measured
    assert verdict == "missed (2.0x off)"


def test_copy_records_follow_the_store_model_and_fill_its_defaults() -> None:
    from sqlalchemy import Table

    from services.members import store
    from services.members.domain import DEFAULT_CARD_TYPE

    table = store.CardRow.__table__
    assert isinstance(table, Table)
    columns, records = dataset.model_records(table, [{"card_number": "77", "member_id": "m", "status": "active"}])
    assert columns == [column.name for column in table.columns]
    row = dict(zip(columns, records[0], strict=True))
    given = (row["card_number"], row["status"], row["card_type"], row["block_reason"])
    assert given == ("77", "active", DEFAULT_CARD_TYPE, "")
    assert row["expires_at"] is None, "a nullable column without a default is NULL"
