"""What ``GET /api/releases`` answers for the dashboard's releases panel (``meshctl.dashboard.
releases_view``): the sequential test's boundaries, each arm's signals, the canary's
log-likelihood ratio after each of its tasks, each version's cumulative signals over time, and the
decision that ended the canary; and the route itself, over a stand-in for the admin's NATS
connection. In a browser: tests/browser/check_dashboard.py."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace
from typing import Any

import nats.js.errors
import pytest

from mesh_contracts.v1.records import ArmStats, ReleaseChannel, ReleaseEvent, TrailPoint, nearest_rank
from mesh_contracts.v1.release import CanaryTest
from meshctl.dashboard import Dashboard, releases_view

pytestmark = pytest.mark.unit

BAD = "0123456789abcdef"  # the canary's version
T0 = 1_000.0


def point(at: float, version: str, bad: bool, llr: float, cost: float, latency: float) -> TrailPoint:
    return TrailPoint(at=T0 + at, version=version, bad=bad, llr=llr, cost_usd=cost, latency_s=latency)


def rolled_back() -> ReleaseChannel:
    """A careless canary against the packaged behaviour, rolled back by the test after its second task."""
    return ReleaseChannel(
        tenant="demo", current="", versions=[BAD], canary="", share=0.0, canary_since=T0,
        canary_by="approver.demo.dana", test=CanaryTest(), llr=3.2,
        arms={
            BAD: ArmStats(tasks=2, bad=2, checks_passed=0, judge_sum=0.4, judge_n=2, cost_usd=0.004,
                          latencies=[5.0, 3.0]),
            "": ArmStats(tasks=2, bad=0, checks_passed=2, judge_sum=1.7, judge_n=2, cost_usd=0.003,
                         latencies=[2.0, 4.0]),
        },
        trail=[
            point(1, "", False, 0.0, 0.001, 2.0),
            point(2, BAD, True, 1.6, 0.003, 5.0),
            point(3, "", False, 1.6, 0.002, 4.0),
            point(4, BAD, True, 3.2, 0.001, 3.0),
        ],
        history=[
            ReleaseEvent(action="draft", version=BAD, by="author.demo.alice", at=T0 - 10),
            ReleaseEvent(action="canary", version=BAD, by="approver.demo.dana", at=T0, forced=True, reason="try"),
            ReleaseEvent(action="rolled_back", version=BAD, by="sequential-test", at=T0 + 4.5, reason="worse",
                         tasks=2, bad=2, llr=3.2, lower=-2.2513, upper=2.8904),
        ],
    )  # fmt: skip


def test_the_boundaries_are_walds_for_the_tests_alpha_and_beta():
    lower, upper = CanaryTest(alpha=0.05, beta=0.10).boundaries()
    assert lower == pytest.approx(math.log(0.10 / 0.95)) == pytest.approx(-2.2513, abs=1e-4)
    assert upper == pytest.approx(math.log(18)) == pytest.approx(2.8904, abs=1e-4)
    lower, upper = CanaryTest(alpha=0.01, beta=0.2).boundaries()
    assert (round(lower, 4), round(upper, 4)) == (-1.5994, 4.382)  # ln(0.2 / 0.99), ln(0.8 / 0.01)
    view = releases_view(rolled_back())
    assert view["boundaries"] == {"lower": pytest.approx(-2.2513, abs=1e-4), "upper": pytest.approx(2.8904, abs=1e-4)}
    assert view["test"]["alpha"] == 0.05 and view["test"]["beta"] == 0.10


def test_p95_is_the_nearest_rank():
    assert nearest_rank([], 0.95) == 0.0
    assert nearest_rank([7.0], 0.95) == 7.0
    assert nearest_rank([5.0, 3.0], 0.95) == 5.0
    assert nearest_rank([float(i) for i in range(1, 21)], 0.95) == 19.0  # rank ceil(0.95 * 20) = 19
    assert (
        nearest_rank([float(i) for i in range(21, 0, -1)], 0.95) == 20.0
    )  # rank ceil(0.95 * 21) = 20, order not assumed
    assert nearest_rank([float(i) for i in range(1, 101)], 0.95) == 95.0


def test_each_arm_summarises_its_signals():
    arms = releases_view(rolled_back())["arms"]
    assert arms[BAD] == {
        "role": "canary", "tasks": 2, "bad": 2, "bad_rate": 1.0, "checks_passed_rate": 0.0,
        "judge_mean": pytest.approx(0.2), "mean_cost_usd": pytest.approx(0.002), "p95_latency_s": 5.0,
        "tool_denials": 0,
    }  # fmt: skip
    assert arms[""] == {
        "role": "current", "tasks": 2, "bad": 0, "bad_rate": 0.0, "checks_passed_rate": 1.0,
        "judge_mean": pytest.approx(0.85), "mean_cost_usd": pytest.approx(0.0015), "p95_latency_s": 4.0,
        "tool_denials": 0,
    }  # fmt: skip
    # An arm with no task has no rates (not zero rates).
    empty = releases_view(ReleaseChannel(tenant="demo", canary=BAD, share=0.3, arms={BAD: ArmStats()}))["arms"][BAD]
    assert empty["bad_rate"] is None and empty["checks_passed_rate"] is None and empty["judge_mean"] is None
    assert (empty["mean_cost_usd"], empty["p95_latency_s"]) == (0.0, 0.0)


def test_the_llr_series_is_the_canarys_observations_from_the_origin():
    view = releases_view(rolled_back())
    assert view["canary"] == BAD and view["baseline"] == "" and not view["running"]
    assert [(p["n"], p["llr"], p["bad"]) for p in view["llr"]] == [(0, 0.0, False), (1, 1.6, True), (2, 3.2, True)]
    assert [p["at"] for p in view["llr"]] == [T0, T0 + 2, T0 + 4]


def test_a_trail_that_lost_its_oldest_points_numbers_the_canary_tasks_it_kept():
    ch = rolled_back()
    ch.arms[BAD].tasks = 5  # three canary tasks no longer in the kept trail
    view = releases_view(ch)
    assert [(p["n"], p["llr"]) for p in view["llr"]] == [(4, 1.6), (5, 3.2)]  # no origin: it is not in the trail


def test_each_version_has_its_cumulative_bad_rate_mean_cost_and_p95_over_time():
    series = releases_view(rolled_back())["series"]
    assert set(series) == {BAD, ""}
    canary = [(p["t_s"], p["n"], p["bad"], p["bad_rate"], round(p["mean_cost_usd"], 6), p["p95_latency_s"])
              for p in series[BAD]]  # fmt: skip
    assert canary == [(2.0, 1, 1, 1.0, 0.003, 5.0), (4.0, 2, 2, 1.0, 0.002, 5.0)]
    current = [(p["t_s"], p["n"], p["bad_rate"], round(p["mean_cost_usd"], 6), p["p95_latency_s"]) for p in series[""]]
    assert current == [(1.0, 1, 0.0, 0.001, 2.0), (3.0, 2, 0.0, 0.0015, 4.0)]


def test_the_running_p95_and_bad_rate_follow_each_task():
    trail = [point(i, "", i % 4 == 0, 0.0, 0.01 * i, float(i)) for i in range(1, 41)]  # latencies 1..40, 10 bad
    ch = ReleaseChannel(tenant="demo", canary=BAD, share=0.5, canary_since=T0, test=CanaryTest(), trail=trail,
                        arms={"": ArmStats(tasks=40, bad=10)})  # fmt: skip
    current = releases_view(ch)["series"][""]
    assert len(current) == 40
    assert current[19]["p95_latency_s"] == 19.0 and current[39]["p95_latency_s"] == 38.0  # ranks 19 of 20, 38 of 40
    assert current[3]["bad_rate"] == 0.25 and current[5]["bad_rate"] == pytest.approx(1 / 6)
    assert current[39]["bad_rate"] == 0.25 and current[39]["mean_cost_usd"] == pytest.approx(0.01 * 41 / 2)


def test_the_decision_is_labelled_with_who_decided_after_how_many_canary_tasks():
    d = releases_view(rolled_back())["decision"]
    assert d["label"] == "rolled back by sequential-test after 2 canary tasks"
    assert (d["action"], d["version"], d["tasks"], d["bad"], d["llr"]) == ("rolled_back", BAD, 2, 2, 3.2)
    # A person's rollback (the event carries no counts: the arm's are used).
    ch = rolled_back()
    ch.history[-1] = ReleaseEvent(action="rollback", version=BAD, by="approver.demo.dana", at=T0 + 5, reason="no")
    assert releases_view(ch)["decision"]["label"] == "rolled back by approver.demo.dana after 2 canary tasks"
    # A promotion by the test: the version is current now, the packaged behaviour its baseline.
    ch = rolled_back()
    ch.current, ch.before, ch.arms = BAD, [""], {BAD: ArmStats(tasks=1, bad=0)}
    ch.history[-1] = ReleaseEvent(action="promoted", version=BAD, by="sequential-test", at=T0 + 9, tasks=1, llr=-2.3)
    view = releases_view(ch)
    assert view["baseline"] == "" and view["arms"][BAD]["role"] == "canary"
    assert view["decision"]["label"] == "promoted by sequential-test after 1 canary task"


def test_a_running_canary_has_no_decision_and_an_empty_channel_has_nothing():
    ch = rolled_back()
    ch.canary, ch.share, ch.history = BAD, 0.5, ch.history[:2]
    view = releases_view(ch)
    assert view["running"] and view["decision"] is None and view["canary"] == BAD and view["baseline"] == ""
    empty = releases_view(ReleaseChannel(tenant="demo"))
    assert (empty["canary"], empty["arms"], empty["llr"], empty["series"], empty["decision"]) == ("", {}, [], {}, None)
    assert empty["channel"]["tenant"] == "demo" and empty["boundaries"]["upper"] == pytest.approx(math.log(18))
    json.dumps(view), json.dumps(empty)  # what the route sends


class FakeJetStream:
    def __init__(self, stored: dict[str, Any]) -> None:
        self.stored, self.asked = stored, []

    async def get_last_msg(self, stream: str, subject: str, direct: bool = False) -> Any:
        self.asked.append((stream, subject, direct))
        if subject not in self.stored:
            raise nats.js.errors.NotFoundError()
        return self.stored[subject]


async def test_the_route_reads_the_channel_as_the_admin_and_only_by_get():
    channel = rolled_back().model_dump(mode="json")
    js = FakeJetStream({
        "$KV.releases.demo.channel": SimpleNamespace(data=json.dumps(channel).encode(), headers=None),
        "$KV.releases.gone.channel": SimpleNamespace(data=b"", headers={"KV-Operation": "DEL"}),
    })  # fmt: skip
    board = Dashboard(lambda: None, None)  # type: ignore[arg-type, return-value]
    board.nc = SimpleNamespace(jetstream=lambda timeout: js)  # type: ignore[assignment]
    board.authorised = lambda token: "admin" if token == "ok" else None  # type: ignore[method-assign]
    signed = {"authorization": "Bearer ok"}

    code, ctype, body, _ = await board.route("GET", "/api/releases?tenant=demo", signed)
    view = json.loads(body)
    assert (code, ctype) == (200, "application/json") and js.asked[-1] == (
        "KV_releases",
        "$KV.releases.demo.channel",
        True,
    )
    assert view["decision"]["label"] == "rolled back by sequential-test after 2 canary tasks"
    assert [p["n"] for p in view["llr"]] == [0, 1, 2] and view["channel"]["canary_by"] == "approver.demo.dana"
    for tenant in ("nobody", "gone"):  # no channel, or a deleted one: a channel with nothing
        code, _, body, _ = await board.route("GET", f"/api/releases?tenant={tenant}", signed)
        assert code == 200 and json.loads(body)["channel"]["versions"] == [] and json.loads(body)["arms"] == {}
    assert (await board.route("GET", "/api/releases?tenant=../x", signed))[0] == 400
    assert (await board.route("GET", "/api/releases", signed))[0] == 400
    assert (await board.route("POST", "/api/releases?tenant=demo", signed))[0] == 405
    assert (await board.route("GET", "/api/releases?tenant=demo", {}))[0] == 401
    assert (await board.route("GET", "/api/releases?tenant=demo", {"authorization": "Bearer forged"}))[0] == 401
