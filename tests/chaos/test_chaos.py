"""Chaos: services die at any moment; no task is lost and no side effect happens twice.

Bounded sizes run in CI; ``MESH_CHAOS=full`` (``make chaos``) runs the issue's sizes. Each
scenario prints a summary line (tasks, faults, lost, duplicated, latency) for the record.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator

import nats
import pytest
import yaml

from mesh_contracts import topology as topo
from mesh_contracts.registry import open_body
from mesh_contracts.v1 import StepRequested, TaskCompleted, TaskPolicy, TaskSubmitted, WaitEnded, WaitStarted
from mesh_testing.chaos import ChaosMesh, outbox_effects, pct, recovery_s, report, stored_per_task
from mesh_testing.infra import Infra, running_infra
from meshctl.cli import main as meshctl

pytestmark = pytest.mark.chaos
FULL = os.environ.get("MESH_CHAOS") == "full"
GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23, and email the answer to ops@acme.test."
ACK_WAIT_S = topo.ACK_WAIT_S  # what ships: the drills assert the guarantees at the real failover timing
ENV = {
    "MESH_ACK_WAIT_S": str(ACK_WAIT_S),
    "MESH_RETRY_DELAYS_S": "[0.2, 0.5, 1, 2]",
    "MESH_LOG_LEVEL": "WARNING",
    # hundreds of tasks a minute each send one email: lift the default per-tenant email rate limit
    "MESH_TOOL_POLICY": '{"send_email": {"rate_per_min": 0}}',
}


@pytest.fixture(scope="module")
def infra() -> Iterator[Infra]:
    with running_infra(["acme", "globex"], name="chaos", ack_wait_s=ACK_WAIT_S) as infra:
        yield infra


async def test_kill_9_workers_repeatedly_loses_nothing_and_duplicates_no_effect(infra):
    # Kills no faster than a replica restarts (~1 s): faster than that is a crash loop, which
    # max_deliver turns into dead letters by design (see the DLQ scenario), not a lost task.
    n, interval, min_kills = (200, (2.0, 5.0), 10) if FULL else (60, (1.0, 2.0), 4)
    mesh = ChaosMesh(infra, env=ENV, replicas={"worker": 2})
    mesh.start()
    await mesh.ready()
    mesh.supervise()
    done = asyncio.Event()
    monkey = asyncio.create_task(mesh.chaos_monkey("worker", interval, min_kills, done))
    t0 = time.monotonic()
    runs: list = []
    try:
        async with infra.client("acme") as c:
            # Waves of n concurrent tasks until at least min_kills kills landed while tasks ran
            # (a faster mesh finishes a wave before the monkey has struck often enough).
            while not runs or (len(mesh.kills) < min_kills and len(runs) < 5 * n):
                wave = len(runs) // n
                runs += await asyncio.gather(*(c.submit(GOAL, task_id=f"kw-{wave}-{i}", timeout=240) for i in range(n)))
        in_flight_kills = len(mesh.kills)
        done.set()
        await asyncio.wait_for(monkey, 60)
    finally:
        await mesh.stop()
    wall = time.monotonic() - t0
    completed = [r for r in runs if isinstance(r.outcome, TaskCompleted)]
    effects = await outbox_effects(infra, "acme")
    lost = len(runs) - len(completed)
    duplicated = sum(max(0, effects[r.task_id] - 1) for r in runs)
    missing = [r.task_id for r in runs if effects[r.task_id] == 0]
    latencies = [r.latency_s for r in completed]
    recovery = recovery_s([t for t, _ in mesh.kills], [r.finished_at for r in completed])
    report(
        "kill -9 worker",
        tasks=len(runs),
        concurrent=n,
        kills=len(mesh.kills),
        kills_while_tasks_ran=in_flight_kills,
        lost=lost,
        duplicated_effects=duplicated,
        missing_effects=len(missing),
        wall_s=round(wall, 1),
        recovery_p50_s=pct(recovery, 0.5),
        recovery_p99_s=pct(recovery, 0.99),
        latency_p50_s=pct(latencies, 0.5),
        latency_p99_s=pct(latencies, 0.99),
    )
    assert in_flight_kills >= min_kills, "the run must actually have been disturbed"
    assert lost == 0, [(r.task_id, r.outcome) for r in runs if not isinstance(r.outcome, TaskCompleted)][:5]
    assert duplicated == 0 and not missing, "exactly one email per task"
    assert all("391" in r.outcome.answer for r in completed)


async def test_crash_after_the_effect_before_it_is_recorded_still_one_effect(infra, tmp_path):
    mesh = ChaosMesh(infra, env=ENV)
    mesh.start(per_service_env={"tool-executor": {"MESH_FAULTS": "after_effect", "MESH_FAULTS_DIR": str(tmp_path)}})
    await mesh.ready()
    mesh.supervise()
    try:
        async with infra.client("acme") as c:
            run = await c.submit(GOAL, task_id="crash-after-effect", timeout=60)
    finally:
        await mesh.stop()
    marker = tmp_path / "fault-after_effect.fired"
    fired = marker.exists()
    effects = await outbox_effects(infra, "acme")
    report(
        "crash after effect, before record",
        tasks=1,
        faults=int(fired),
        restarts=sum(mesh.restarts.values()),
        lost=int(not isinstance(run.outcome, TaskCompleted)),
        effects=effects["crash-after-effect"],
        latency_s=round(run.latency_s, 2),
        recovery_s=round(run.finished_at - marker.stat().st_mtime, 2) if fired and run.finished_at else None,
    )
    assert fired and mesh.restarts["tool-executor-0"] >= 1, "the tool-executor died right after the effect"
    assert isinstance(run.outcome, TaskCompleted), run.outcome
    assert effects["crash-after-effect"] == 1


async def test_a_budget_killed_between_two_spend_records_counts_every_call_once(infra, tmp_path):
    """The spend records are checkpoints of the usage stream: the budget dies right after writing
    one record of a round (the task's, before the tenant-day's and the mark). The restarted budget
    folds the stream again from the mark: the day gets the calls it lacked, the task none twice.
    (The tenant-day ceiling reads the day total: a call counted for its task but lost from its day
    would let a tenant overspend its day after the next Redis rebuild.)"""
    fault = "budget_mid_checkpoint"
    mesh = ChaosMesh(infra, env=ENV)
    mesh.start(per_service_env={"budget": {"MESH_FAULTS": fault, "MESH_FAULTS_DIR": str(tmp_path)}})
    await mesh.ready()
    mesh.supervise()
    day_key = f"tenant.globex.{time.strftime('%Y%m%d', time.gmtime())}"
    task, day = {}, {}
    try:
        async with infra.client("globex") as c:
            run = await c.submit(GOAL, task_id="budget-crash", timeout=90)
        admin = await infra.admin()
        kv = await admin.jetstream().key_value("budget")
        for _ in range(300):  # the records trail the outcome by a checkpoint, and a restart
            try:
                task = json.loads((await kv.get("usage.globex.budget-crash")).value)
                day = json.loads((await kv.get(day_key)).value)
            except nats.js.errors.KeyNotFoundError:
                await asyncio.sleep(0.1)
                continue
            if day["total"] == task["total"] and task["total"]["calls"] == run_calls(run):
                break
            await asyncio.sleep(0.1)
        await admin.close()
    finally:
        await mesh.stop()
    report("budget killed between two spend records", task=task.get("total"), day=day.get("total"))
    assert (tmp_path / f"fault-{fault}.fired").exists() and mesh.restarts["budget-0"] >= 1
    assert isinstance(run.outcome, TaskCompleted), run.outcome
    assert task["total"]["calls"] == run_calls(run), "every call of the task, once"
    assert day["total"] == task["total"], "every call counted once for its task and once for its day"


def run_calls(run) -> int:
    """Model calls the task made, as its outcome reports them."""
    return run.outcome.usage.calls


async def test_the_same_task_submitted_50_times_concurrently_runs_once(infra):
    mesh = ChaosMesh(infra, env=ENV, replicas={"planner": 2})
    mesh.start()
    await mesh.ready()
    task_id = "dup-50"
    seen: dict[str, int] = {}
    try:
        async with infra.client("acme") as c:
            assert c.nc is not None

            async def count(msg):
                kind = json.loads(msg.data)["type"]
                seen[kind] = seen.get(kind, 0) + 1

            await c.nc.subscribe(f"task.*.acme.{task_id}.>", cb=count)
            model = TaskSubmitted(tenant="acme", task_id=task_id, goal=GOAL)
            # distinct message ids, so the server's dedup does not absorb them: the planner must
            await asyncio.gather(*(c.publish(model, key=f"copy-{i}") for i in range(50)))
            deadline = time.monotonic() + 60
            while "task.completed" not in seen and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # a second run would publish its own outcome right after
        model_calls = await planner_model_calls(mesh)
    finally:
        await mesh.stop()
    effects = await outbox_effects(infra, "acme")
    admin = await infra.admin()
    try:
        usage = json.loads((await (await admin.jetstream().key_value("budget")).get(f"usage.acme.{task_id}")).value)
        info = await admin.jetstream().stream_info("TASK", subjects_filter=f"task.*.acme.{task_id}.*")
    finally:
        await admin.close()
    stored = {k.rsplit(".", 1)[-1]: v for k, v in (info.state.subjects or {}).items()}
    report(
        "same task id x50",
        submissions=50,
        stored=stored,
        live_deliveries=seen,
        planner_model_calls=model_calls,
        effects=effects[task_id],
    )
    assert stored["submitted"] == 50, "every copy reached the stream"
    assert stored["planned"] == 1 and stored["completed"] == 1, "one plan, one outcome stored"
    assert model_calls == 1 and usage["by_agent"]["planner/planner"]["calls"] == 1, "planned, and paid for, once"
    assert effects[task_id] == 1
    # Live (core) deliveries are at-least-once: a republished duplicate that the stream dropped
    # still reaches live subscribers. Clients act on the first outcome.
    assert seen.get("task.completed", 0) >= 1


async def test_a_frozen_worker_past_ack_wait_cannot_commit_stale_work(infra):
    """SIGSTOP the only worker mid-run for 2.5 x ack_wait; a second worker takes the redelivered
    messages; SIGCONT: the stale worker's writes are fenced off, every effect happens once."""
    import signal

    n = 60 if FULL else 20
    mesh = ChaosMesh(infra, env=ENV)
    mesh.start()
    await mesh.ready()
    async with infra.client("globex") as c:
        runs = asyncio.gather(*(c.submit(GOAL, task_id=f"stop-{i}", timeout=120) for i in range(n)))
        await asyncio.sleep(0.4)  # worker-0, the only worker, is now holding in-flight messages
        mesh.kill("worker-0", signal.SIGSTOP)
        frozen_until = time.monotonic() + ACK_WAIT_S * 2.5
        await mesh.add("worker", "worker-1")  # ready, or this fails saying why (not a silent stall)
        await asyncio.sleep(frozen_until - time.monotonic())
        mesh.kill("worker-0", signal.SIGCONT)
        results = await runs
        fenced = await mesh.counters("worker-0")
        redelivered = (await mesh.counters("worker-1")).get("mesh.messages.redelivered", 0)
    await mesh.stop()
    effects = await outbox_effects(infra, "globex")
    stored = await stored_per_task(infra, "globex", [f"stop-{i}" for i in range(n)])
    lost = sum(not isinstance(r.outcome, TaskCompleted) for r in results)
    stopped_at = mesh.kills[0][0]
    resumed = recovery_s([stopped_at], [r.finished_at for r in results if r.finished_at])
    report(
        "SIGSTOP worker past ack_wait",
        tasks=n,
        frozen_s=ACK_WAIT_S * 2.5,
        redelivered=redelivered,
        fenced_writes=fenced.get("mesh.steps.fenced", 0),
        lost=lost,
        duplicated_effects=sum(max(0, effects[f"stop-{i}"] - 1) for i in range(n)),
        recovery_s=pct(resumed, 0.5),
    )
    assert redelivered > 0, "the frozen worker's messages went to the other worker"
    assert lost == 0
    assert all(effects[f"stop-{i}"] == 1 for i in range(n)), "one email per task"
    assert all(v == {"step.completed": 4, "tool.requested": 2, "task.completed": 1} for v in stored.values()), stored


async def test_a_redelivery_after_the_dedup_window_still_has_one_effect(infra):
    """To the server a redelivery from beyond its dedup window is just a new message id; the
    ledger must catch it. Simulated by re-sending the email request under a fresh id."""
    from mesh_contracts.v1 import ToolRequested
    from mesh_identity import Signer
    from mesh_kit import envelope as env

    mesh = ChaosMesh(infra, env=ENV)
    mesh.start()
    await mesh.ready()
    try:
        async with infra.client("acme") as c:
            run = await c.submit(GOAL, task_id="late-dup", timeout=60)
        assert isinstance(run.outcome, TaskCompleted)
        handled_before = (await mesh.counters("tool-executor-0")).get("mesh.messages.handled", 0)
        admin = await infra.admin()
        original = await admin.jetstream().get_last_msg("TOOL", "tool.v1.acme.late-dup.requested")  # the email
        await admin.close()
        nc = await nats.connect(  # re-sent as the worker would re-send it
            infra.nats_url, **infra.ids.connect_options("worker")
        )
        js = nc.jetstream()
        request = ToolRequested.parse(original.data)
        assert request.tool == "send_email"
        body = request.to_bytes()
        headers = env.headers_for(
            Signer.from_file("worker", infra.ids.signing_key("worker")),
            request,
            body,
            msg_id="redelivered-after-the-window",
        )
        ack = await js.publish(request.subject(), body, headers=headers)
        await nc.close()
        assert not ack.duplicate, "the server does not recognise it: only the ledger can"
        deadline = time.monotonic() + 15
        while (await mesh.counters("tool-executor-0")).get("mesh.messages.handled", 0) == handled_before:
            assert time.monotonic() < deadline, "the late duplicate was never handled"
            await asyncio.sleep(0.1)
    finally:
        await mesh.stop()
    effects = await outbox_effects(infra, "acme")
    report("redelivery after the dedup window", tasks=1, late_duplicates=1, effects=effects["late-dup"])
    assert effects["late-dup"] == 1


async def test_kill_9_the_planner_mid_task_repeats_no_model_call_and_changes_no_answer(infra, tmp_path):
    log = tmp_path / "model-calls.jsonl"
    mesh = ChaosMesh(infra, env={**ENV, "MESH_SCRIPTED_LOG": str(log)})
    mesh.start()
    await mesh.ready()
    mesh.supervise()
    goal = "Which identity token do messages carry? Also compute 12 * 12, and email the answer to sec@acme.test."
    killed: list[str] = []

    def kill_planner_after_first_step(event) -> None:
        if getattr(event, "stage", "") == "step.completed" and event.source == "planner" and not killed:
            mesh.kill("planner-0")
            killed.append(event.step_id)

    try:
        async with infra.client("acme") as c:
            baseline = await c.submit(goal, task_id="pc-base", timeout=60)
            baseline_calls = len(log.read_text().splitlines())
            chaos = await c.submit(goal, task_id="pc-chaos", timeout=120, on_event=kill_planner_after_first_step)
    finally:
        await mesh.stop()
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    chaos_calls = calls[baseline_calls:]
    digests = [c["digest"] for c in chaos_calls]
    repeated = {d for d in digests if digests.count(d) > 1}  # the same call twice within the chaos run
    report(
        "kill -9 planner after 1 of 4 steps",
        tasks=1,
        killed_after=killed,
        planner_restarts=mesh.restarts["planner-0"],
        model_calls_baseline=baseline_calls,
        model_calls_with_crash=len(chaos_calls),
        repeated_calls=len(repeated),
        recovery_s=round(chaos.finished_at - mesh.kills[0][0], 2) if killed and chaos.finished_at else None,
        identical_answer=bool(chaos.outcome and baseline.outcome and chaos.outcome.answer == baseline.outcome.answer),
    )
    assert killed and mesh.restarts["planner-0"] >= 1, "the planner died mid-task"
    assert isinstance(baseline.outcome, TaskCompleted) and isinstance(chaos.outcome, TaskCompleted)
    assert chaos.outcome.answer == baseline.outcome.answer and chaos.outcome.citations == baseline.outcome.citations
    assert not repeated and len(chaos_calls) == baseline_calls, "recovery repeated no model call"


async def planner_model_calls(mesh: ChaosMesh) -> int:
    return sum([(await mesh.counters(name)).get("mesh.llm.calls", 0) for name in mesh.names("planner")])


def test_the_harness_refuses_to_signal_a_process_it_did_not_start(infra):
    import subprocess

    from mesh_testing.chaos import NotOurProcess
    from meshctl import local

    bystander = subprocess.Popen(["sleep", "30"])
    try:
        mesh = ChaosMesh(infra)
        mesh.procs["worker-9"] = ("worker", local.Proc("worker-9", bystander.pid, ["x"], "x.log", started=1))
        with pytest.raises(NotOurProcess):
            mesh.kill("worker-9")
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


async def test_poison_messages_are_dead_lettered_without_slowing_other_tasks(infra):
    """Task submissions that fail on every attempt are injected (one a second) into a steady
    load, in windows that alternate with windows of the same load without poison (ABBA). Every
    other task completes, every poison is dead-lettered after its 5 attempts with the reason, the
    client is told, and, while each poison waits out its retries (NAK delays, not a handler
    sleeping on it), tasks sent after it are taken up. The latency ratios of the two kinds of
    window are reported, not asserted: they measured the machine as much as the mesh (p95 ratios
    of 0.25-2.78 and median ratios of 0.93-2.06 for the same code, here and in CI)."""
    from mesh_contracts.v1 import TaskRejected
    from mesh_kit import envelope as env
    from mesh_kit.faults import POISON_MARKER
    from meshctl.dlq import entries

    # CI: four ABBA rounds, not two: one slow stretch of a shared machine falls on fewer of the windows.
    m, rounds, rate = (50, 4, 5.0) if FULL else (25, 4, 5.0)
    mesh = ChaosMesh(infra, env=ENV)  # fast backoff: a poison's 5 attempts take ~3.7 s, not 17.5 s
    mesh.start(per_service_env={"planner": {"MESH_FAULTS": "poison"}})
    await mesh.ready()
    pill = POISON_MARKER.decode()

    async def window(c, name: str, poison: bool, m: int = m):
        """``m`` tasks at ``rate`` per second (open loop); with ``poison``, one poison a second."""
        runs, pills = [], []
        for i in range(m):
            runs.append(asyncio.create_task(c.submit(GOAL, task_id=f"{name}-{i}", timeout=120)))
            if poison and i % int(rate) == 0:
                goal = f"{GOAL} {pill}"
                pills.append(asyncio.create_task(c.submit(goal, task_id=f"{name}-poison-{i}", timeout=120)))
            await asyncio.sleep(1 / rate)
        return await asyncio.gather(*runs), await asyncio.gather(*pills)

    baseline, poisoned, pills = [], [], []
    try:
        async with infra.client("acme") as c:
            await window(c, "warm", False, m // 2)  # first-run costs (imports, caches) out of both
            for r in range(rounds):
                for poison in (False, True) if r % 2 == 0 else (True, False):
                    runs, p = await window(c, f"{'pois' if poison else 'base'}{r}", poison)
                    (poisoned if poison else baseline).extend(runs)
                    pills.extend(p)
    finally:
        await mesh.stop()
    admin = await infra.admin()
    try:
        letters = {
            (m.headers or {}).get(f"{env.ORIG_PREFIX}{env.TASK}", ""): m.headers or {}
            async for _, m in entries(admin.jetstream())
            if pill in _opened_letter(m)
        }
    finally:
        await admin.close()
    ok_base = [r.latency_s for r in baseline if isinstance(r.outcome, TaskCompleted)]
    ok_pois = [r.latency_s for r in poisoned if isinstance(r.outcome, TaskCompleted)]
    p95_base, p95_pois = pct(ok_base, 0.95), pct(ok_pois, 0.95)
    rejected = [p for p in pills if isinstance(p.outcome, TaskRejected)]
    n = m * rounds
    report(
        "poison messages",
        tasks=2 * n,
        poison_messages=len(pills),
        dead_lettered=len(letters),
        attempts_each=sorted({int(h.get(env.DLQ_DELIVERIES, 0)) for h in letters.values()}),
        clients_told=len(rejected),
        time_to_dead_letter_p50_s=pct([p.latency_s for p in rejected], 0.5),
        lost=2 * n - len(ok_base) - len(ok_pois),
        p95_baseline_s=p95_base,
        p95_with_poison_s=p95_pois,
        p95_ratio=round(p95_pois / p95_base, 2) if p95_base else None,
        p50_baseline_s=pct(ok_base, 0.5),
        p50_with_poison_s=pct(ok_pois, 0.5),
    )
    assert len(ok_base) == n and len(ok_pois) == n, "every other task completed"
    assert len(pills) >= 5 and len(rejected) == len(pills), [p.outcome for p in pills if p not in rejected][:2]
    assert all("injected poison" in p.outcome.reason and "5 attempts" in p.outcome.reason for p in rejected)
    assert sorted(letters) == sorted(p.task_id for p in pills), "each poison message is in the DLQ"
    assert all(h.get(env.DLQ_DELIVERIES) == "5" and "injected poison" in h[env.DLQ_REASON] for h in letters.values())
    # A poison message is retried with NAK delays, never by a handler that sleeps on it: while each
    # one waits out its retries, tasks sent after it are taken up. Said as an order of events (the
    # latency ratios above are a report, not a bound: they depend on the machine). Taken up, not
    # finished: a whole task outlasted a poison's ~3.7 s of retries on a loaded machine.
    done = [r for r in poisoned if isinstance(r.outcome, TaskCompleted)]
    for p in rejected:
        overtook = [r for r in done if p.submitted_at < r.submitted_at and 0 < r.taken_up_at < p.finished_at]
        assert overtook, f"no task sent after poison {p.task_id} was taken up before it was dead-lettered"


async def test_timers_fire_when_due_through_planner_kills_none_lost_none_early(infra, tmp_path):
    """Concurrent workflow tasks each wait on a durable timer while the planner is killed -9
    twice (and restarted, as Kubernetes would): every timer fires, none before its time, each
    task completes once. Lateness is the broker's ``wait.ended.late_s``."""
    n, after_s = (200, 8.0) if FULL else (20, 5.0)
    wf = tmp_path / "cool.yaml"
    wf.write_text(yaml.safe_dump({"name": "cool", "nodes": [
        {"id": "cool", "kind": "timer", "after_s": after_s},
        {"id": "reply", "kind": "agent", "role": "answer", "after": ["cool"], "instruction": "#say: cooled off"}]}))  # fmt: skip
    home, url = ["--home", str(infra.home)], ["--nats-url", infra.nats_url]
    mesh = ChaosMesh(infra, env=ENV)
    mesh.start()
    await mesh.ready()
    mesh.supervise()
    try:
        assert await asyncio.to_thread(meshctl, [*home, "authors", "add", "tim", "--tenant", "acme", *url]) == 0
        assert (
            await asyncio.to_thread(meshctl, [*home, "workflow", "publish", str(wf), "--as", "author.acme.tim", *url])
            == 0
        )
        async with infra.client("acme") as c:
            runs = asyncio.gather(*(c.submit("cool off", task_id=f"tm-{i}", workflow="cool", policy=TaskPolicy(judge=False), timeout=240)
                                    for i in range(n)))  # fmt: skip
            await asyncio.sleep(after_s * 0.3)
            mesh.kill("planner-0")
            await asyncio.sleep(after_s * 0.4)
            mesh.kill("planner-0")
            done = await runs
    finally:
        await mesh.stop()
    completed = [r for r in done if isinstance(r.outcome, TaskCompleted)]
    late, early = [], []
    for r in completed:
        [began] = [WaitStarted.parse(m.data)
                   for m in await infra.stored("TASK", f"task.v1.acme.{r.task_id}.waiting")]  # fmt: skip
        [ended] = [WaitEnded.parse(m.data)
                   for m in await infra.stored("TASK", f"task.v1.acme.{r.task_id}.waited")]  # fmt: skip
        [reply] = [m for m in await infra.stored("STEP", f"step.v1.acme.{r.task_id}.requested")
                   if StepRequested.parse(m.data).step.step_id == "reply"]  # fmt: skip
        assert began.until is not None and ended.late_s is not None
        late.append(ended.late_s)
        if reply.metadata.timestamp.timestamp() < began.until - 0.05:
            early.append(r.task_id)
    report(
        "timers through planner kills", tasks=n, after_s=after_s, planner_kills=len(mesh.kills),
        completed=len(completed), lost=n - len(completed), fired_early=len(early),
        late_p50_s=pct(late, 0.5), late_p99_s=pct(late, 0.99), late_max_s=pct(late, 1.0),
    )  # fmt: skip
    assert len(completed) == n, [r.outcome for r in done if not isinstance(r.outcome, TaskCompleted)][:3]
    assert early == [], early


def _opened_letter(m) -> str:
    """A dead letter's body as text, its sealed fields opened (the test holds the data keys)."""
    try:
        return json.dumps(open_body((m.headers or {}).get("Mesh-Dlq-Subject", ""), m.data or b"{}"))
    except ValueError:  # not JSON, or not a mesh subject: as it is
        return (m.data or b"").decode("utf-8", "replace")
