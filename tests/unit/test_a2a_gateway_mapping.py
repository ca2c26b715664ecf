"""The A2A gateway's mapping, without a mesh: a message's task id, goal, inputs, policy and decision;
the mesh's events as A2A updates (progress, token chunks, a held call, the outcome); a task rebuilt
from what the mesh stored; the task store's cache over the mesh; the push URL gate; the cards."""

from __future__ import annotations

from typing import Any

import pytest
from a2a.helpers import get_artifact_text, get_message_text, new_data_part
from a2a.types import Message, Part, Role, Task, TaskArtifactUpdateEvent, TaskState, TaskStatusUpdateEvent

from mesh_a2a import mapping, store
from mesh_a2a.callers import Caller, caller_of
from mesh_a2a.cards import card, endpoint
from mesh_a2a.errors import BadAsk
from mesh_a2a.exposed import Agent, mesh_agent
from mesh_a2a.inbound import ask_of, context_id_for, decision_of, labels_for, task_id_for
from mesh_a2a.push import host_allowed, url_check
from mesh_a2a.settings import A2aSettings
from mesh_edge.follow import Event
from mesh_edge.users import User

pytestmark = pytest.mark.unit

TRIAGE = Agent("triage", "workflow", "Triage a ticket.", "v1", {"type": "object"}, {"workflow": "triage@v1"})
S = TaskState


def message(*parts: Part, **metadata: Any) -> Message:
    m = Message(role=Role.ROLE_USER, message_id="m-1", parts=list(parts))
    if metadata:
        m.metadata.update(metadata)
    return m


def text(value: str) -> Part:
    return Part(text=value)


# --- inbound ---------------------------------------------------------------------------------


def test_a_retried_message_is_the_same_task_and_anything_else_is_another():
    one = task_id_for("acme", "alice", "mesh", "m-1")
    assert one == task_id_for("acme", "alice", "mesh", "m-1") and one.startswith("a2a-") and len(one) <= 64
    others = {task_id_for(*args) for args in (("acme", "alice", "mesh", "m-2"), ("acme", "bob", "mesh", "m-1"),
                                               ("beta", "alice", "mesh", "m-1"), ("acme", "alice", "triage", "m-1"))}  # fmt: skip
    assert one not in others and len(others) == 4
    assert context_id_for(one) == context_id_for(one) != context_id_for(task_id_for("acme", "alice", "mesh", "m-2"))
    assert labels_for("alice", "ctx-1", "mesh") == {"user": "alice", "a2a.context": "ctx-1", "a2a.agent": "mesh"}
    with pytest.raises(BadAsk, match="context id"):
        labels_for("alice", "c" * 200, "mesh")


def test_the_text_parts_are_the_goal_and_a_data_part_the_workflows_inputs():
    ask = ask_of(message(text("  What is 17 * 23?  "), text("Say why.")), mesh_agent())
    assert ask.goal == "What is 17 * 23?\nSay why." and ask.inputs == {} and ask.priority == 5
    wf = ask_of(message(text("Triage it"), new_data_part({"topic": "billing", "count": 4, "tags": [1.5, 2]})), TRIAGE)
    assert wf.inputs == {"topic": "billing", "count": 4, "tags": [1.5, 2]}  # whole numbers back as ints
    assert isinstance(wf.inputs["count"], int)
    assert ask_of(message(new_data_part({"topic": "x"})), TRIAGE).goal == "Run the triage workflow"
    meta = ask_of(message(text("go"), policy={"judge": False, "on_held": "wait"}, priority=9), mesh_agent())
    assert (meta.policy.judge, meta.policy.on_held, meta.priority) == (False, "wait", 9)
    # the request's metadata counts too; the message's own wins
    assert ask_of(message(text("go"), priority=2), mesh_agent(), {"priority": 7}).priority == 2


@pytest.mark.parametrize(
    ("parts", "meta", "agent", "says"),
    [
        ((), {}, None, "no text"),
        ((Part(text="go"), new_data_part({"a": 1})), {}, None, "takes no inputs"),
        ((Part(text="go"), new_data_part({"a": 1}), new_data_part({"b": 2})), {}, TRIAGE, "at most one data part"),
        ((Part(text="go"), new_data_part([1, 2])), {}, TRIAGE, "JSON object"),
        ((Part(text="x" * 10_001),), {}, None, "longer than 10000"),
        ((Part(text="go"),), {"policy": {"on_held": "sometimes"}}, None, "metadata.policy"),
        ((Part(text="go"),), {"priority": 12}, None, "priority is 0-9"),
    ],
)
def test_a_message_the_mesh_cannot_run_says_why_in_one_line(parts, meta, agent, says):
    with pytest.raises(BadAsk, match=says):
        ask_of(message(*parts, **meta), agent or mesh_agent())


def test_a_reply_carries_a_decision_in_words_or_as_data():
    assert decision_of(message(text("Approve, looks right."))) == decision_of(message(text("yes looks right")))
    approved = decision_of(message(text("approve: looks right")))
    assert approved is not None and approved.approve and approved.comment == "looks right"
    denied = decision_of(message(text("No - not this note")))
    assert denied is not None and not denied.approve and denied.comment == "not this note"
    data = decision_of(message(new_data_part({"approve": False, "comment": "no", "approval_id": "ap-1"})))
    assert data is not None and (data.approve, data.comment, data.approval_id) == (False, "no", "ap-1")
    assert decision_of(message(text("what does it write?"))) is None
    assert decision_of(message(new_data_part({"approve": "yes"}))) is None


# --- outbound --------------------------------------------------------------------------------


def translator(*, waits: bool = False, can_decide: bool = False) -> mapping.Translator:
    return mapping.Translator("a2a-1", "ctx-1", waits=waits, can_decide=can_decide)


def test_progress_is_working_with_the_line_and_its_stage_in_the_metadata():
    events, last = translator().translate(Event("progress", {"source": "planner", "stage": "plan.created",
                                                             "message": "3 steps", "step_id": ""}, "id-1"))  # fmt: skip
    (update,) = events
    assert isinstance(update, TaskStatusUpdateEvent) and not last
    assert (
        update.status.state == S.TASK_STATE_WORKING
        and get_message_text(update.status.message) == "plan.created: 3 steps"
    )
    assert update.metadata["mesh.stage"] == "plan.created" and update.status.message.role == Role.ROLE_AGENT


def test_tokens_are_chunks_of_one_draft_per_model_call_and_a_reset_starts_it_again():
    t = translator()

    def token(call: str, txt: str, kind: str = "delta") -> TaskArtifactUpdateEvent | None:
        events, last = t.translate(
            Event("token", {"step_id": "s1", "call_id": call, "seq": 0, "text": txt, "kind": kind})
        )
        assert not last
        return events[0] if events else None  # type: ignore[return-value]

    chunks = [token("c1", "Hel"), token("c1", "lo"), token("c2", "Other"), token("c1", "", "reset"), token("c1", "Hi")]
    assert [c.artifact.artifact_id for c in chunks if c] == ["draft-c1", "draft-c1", "draft-c2", "draft-c1", "draft-c1"]
    assert [c.append for c in chunks if c] == [False, True, False, False, True]
    assert [get_artifact_text(c.artifact) for c in chunks if c] == ["Hel", "lo", "Other", "", "Hi"]
    assert token("c1", "", "end") is None and token("c1", "") is None


def test_a_held_call_asks_the_caller_who_may_decide_and_otherwise_waits_for_an_approver():
    approval = {"approval_id": "ap-1", "tool": "note_write", "arguments": {"note_id": "n"}, "reason": "tainted step"}
    (asked,), stop = translator(waits=True, can_decide=True).translate(Event("approval", approval, "msg-7"))
    assert stop and asked.status.state == S.TASK_STATE_INPUT_REQUIRED
    assert "note_write" in get_message_text(asked.status.message) and "approve" in get_message_text(
        asked.status.message
    )
    assert (asked.metadata["mesh.after"], asked.metadata["mesh.approval"]) == ("msg-7", "ap-1")
    (elsewhere,), stop = translator(waits=True).translate(Event("approval", approval, "msg-7"))
    assert not stop and elsewhere.status.state == S.TASK_STATE_AUTH_REQUIRED  # followed on: decided out of band
    assert "meshctl approvals" in get_message_text(elsewhere.status.message)
    (goes_on,), stop = translator(can_decide=True).translate(Event("approval", approval, "msg-7"))
    assert not stop and goes_on.status.state == S.TASK_STATE_WORKING  # on_held=continue: nothing waits
    (decided,), stop = translator().translate(Event("decision", {"approval_id": "ap-1", "approved": True,
                                                                 "decided_by": "approver.acme.alice"}))  # fmt: skip
    assert not stop and get_message_text(decided.status.message) == "approved by approver.acme.alice"


def test_the_outcome_ends_it_completed_with_the_answer_failed_canceled_or_rejected_with_why():
    events, stop = translator().translate(Event("outcome", {"type": "task.completed", "answer": "391",
                                                            "citations": [{"doc": "d"}], "workflow": "w@1"}))  # fmt: skip
    artifact, done = events
    assert stop and isinstance(artifact, TaskArtifactUpdateEvent) and isinstance(done, TaskStatusUpdateEvent)
    assert artifact.artifact.artifact_id == "answer" and get_artifact_text(artifact.artifact) == "391"
    assert artifact.last_chunk and not artifact.append and artifact.artifact.metadata["workflow"] == "w@1"
    assert done.status.state == S.TASK_STATE_COMPLETED
    for outcome, state, says in (
        ({"type": "task.failed", "reason": "step s1 failed"}, S.TASK_STATE_FAILED, "step s1 failed"),
        ({"type": "task.failed", "reason": "cancelled by client.acme: over A2A"}, S.TASK_STATE_CANCELED, "cancelled"),
        ({"type": "task.rejected", "reason": "over quota", "code": "rate_limited", "retry_after_s": 2.0},
         S.TASK_STATE_REJECTED, "over quota (rate_limited; retry after 2 s)"),
    ):  # fmt: skip
        (update,), stop = translator().translate(Event("outcome", outcome))
        assert stop and update.status.state == state and says in get_message_text(update.status.message)


SUBMITTED = {"goal": "What is 17 * 23?", "inputs": {}, "policy": {"on_held": "wait"},
             "labels": {"user": "alice", "a2a.context": "ctx-9", "a2a.agent": "mesh"}}  # fmt: skip


def test_a_task_rebuilt_from_the_mesh_reads_as_it_ran():
    done = mapping.rebuilt("a2a-9", SUBMITTED, {"type": "task.completed", "answer": "391"}, None, False)
    assert (done.id, done.context_id, done.status.state) == ("a2a-9", "ctx-9", S.TASK_STATE_COMPLETED)
    assert get_message_text(done.history[0]) == "What is 17 * 23?" and done.history[0].role == Role.ROLE_USER
    assert get_artifact_text(done.artifacts[0]) == "391" and mapping.meta(done, mapping.M_AGENT) == "mesh"
    waiting = Event("approval", {"approval_id": "ap-2", "tool": "note_write"}, "msg-3")
    asked = mapping.rebuilt("a2a-9", SUBMITTED, None, waiting, True)
    assert asked.status.state == S.TASK_STATE_INPUT_REQUIRED and mapping.meta(asked, mapping.M_AFTER) == "msg-3"
    assert mapping.rebuilt("a2a-9", SUBMITTED, None, waiting, False).status.state == S.TASK_STATE_AUTH_REQUIRED
    assert mapping.rebuilt("a2a-9", SUBMITTED, None, None, True).status.state == S.TASK_STATE_WORKING


# --- the store over the mesh -----------------------------------------------------------------


class Context:
    """The part of an A2A call context the store reads."""

    def __init__(self, caller: Caller) -> None:
        self.state = {"caller": caller}


def caller(tenant: str = "acme", agent: Agent | None = None) -> Caller:
    return Caller(User("alice", tenant, 0.0), agent or mesh_agent(), client=None)  # type: ignore[arg-type]


async def test_the_store_answers_from_the_mesh_and_keeps_only_the_detail_of_what_it_followed(monkeypatch):
    in_mesh: dict[str, Task] = {}

    async def read(c: Caller, task_id: str, can_decide: bool) -> Task | None:
        return in_mesh.get(f"{c.tenant}/{task_id}")

    monkeypatch.setattr(store, "read", read)
    s = store.MeshTaskStore(lambda c: False, size=2)
    acme, beta = Context(caller()), Context(caller("beta"))
    assert caller_of(acme).tenant == "acme"  # type: ignore[arg-type]
    in_mesh["acme/a2a-1"] = mapping.rebuilt("a2a-1", SUBMITTED, None, None, False)
    assert (await s.get("a2a-1", acme)).status.state == S.TASK_STATE_WORKING  # type: ignore[arg-type,union-attr]
    assert await s.get("a2a-1", beta) is None  # type: ignore[arg-type]
    # followed here: its detail (drafts) comes from the cache; once the mesh has its outcome, that wins
    live = mapping.rebuilt("a2a-1", SUBMITTED, None, None, False)
    live.artifacts.add(artifact_id="draft-c1")
    await s.save(live, acme)  # type: ignore[arg-type]
    assert [a.artifact_id for a in (await s.get("a2a-1", acme)).artifacts] == ["draft-c1"]  # type: ignore[arg-type,union-attr]
    in_mesh["acme/a2a-1"] = mapping.rebuilt(
        "a2a-1", SUBMITTED, {"type": "task.completed", "answer": "391"}, None, False
    )
    ended = await s.get("a2a-1", acme)  # type: ignore[arg-type]
    assert ended is not None and ended.status.state == S.TASK_STATE_COMPLETED
    assert [a.artifact_id for a in ended.artifacts] == ["draft-c1", "answer"]
    # another agent's task is not found, even when cached
    assert await s.get("a2a-1", Context(caller(agent=TRIAGE))) is None  # type: ignore[arg-type]
    # a task being created here is not the mesh's until the SDK saved it
    in_mesh["acme/a2a-2"] = mapping.rebuilt("a2a-2", SUBMITTED, None, None, False)
    s.create("acme", "a2a-2")
    assert await s.get("a2a-2", acme) is None  # type: ignore[arg-type]
    s.create("acme", "a2a-2", done=True)
    assert await s.get("a2a-2", acme) is not None  # type: ignore[arg-type]
    # bounded: the oldest detail goes first (the mesh keeps the rest)
    for i in range(3):
        await s.save(mapping.rebuilt(f"a2a-x{i}", SUBMITTED, None, None, False), acme)  # type: ignore[arg-type]
    assert len(s.cache) == 2 and ("acme", "a2a-1") not in s.cache


# --- push notifications, cards, settings -----------------------------------------------------


@pytest.mark.parametrize(
    ("url", "allowed", "ok"),
    [
        ("http://127.0.0.1:8000/hook", ["127.0.0.1"], True),
        ("https://hooks.example.com/x", ["*.example.com"], True),
        ("https://example.com/x", ["*.example.com"], False),
        ("https://a.example.com:8443/x", ["a.example.com:8443"], True),
        ("https://a.example.com/x", ["a.example.com:8443"], False),
        ("http://HOOKS.example.com/x", ["hooks.example.com"], True),
        ("ftp://hooks.example.com/x", ["hooks.example.com"], False),
        ("http://user:pw@hooks.example.com/x", ["hooks.example.com"], False),
        ("http://169.254.169.254/latest/meta-data", ["127.0.0.1"], False),
        ("http://hooks.example.com.evil.io/x", ["hooks.example.com"], False),
    ],
)
def test_a_push_url_goes_to_a_listed_host_only(url, allowed, ok):
    assert host_allowed(url, allowed) is ok


async def test_without_a_list_only_public_hosts_are_pushed_to():
    check = url_check([])
    for private in ("http://127.0.0.1/x", "http://10.0.0.5/x", "http://169.254.169.254/x", "http://[::1]/x",
                    "file:///etc/passwd"):  # fmt: skip
        assert not await check(private), private
    assert await url_check(["127.0.0.1"])("http://127.0.0.1:9/x")


def test_a_card_names_its_endpoint_bearer_jwt_streaming_and_push_and_a_workflows_inputs():
    c = card("https://agents.example.com/", "acme", TRIAGE)
    assert c.name == "acme/triage" and c.version == "v1" and c.description == "Triage a ticket."
    assert c.supported_interfaces[0].url == endpoint("https://agents.example.com", "acme", "triage")
    assert c.supported_interfaces[0].url == "https://agents.example.com/a2a/acme/triage"
    assert c.supported_interfaces[0].protocol_binding == "JSONRPC"
    assert c.capabilities.streaming and c.capabilities.push_notifications
    scheme = c.security_schemes["bearer"].http_auth_security_scheme
    assert (scheme.scheme, scheme.bearer_format) == ("Bearer", "JWT") and "bearer" in c.security_requirements[0].schemes
    assert c.skills[0].id == "triage" and '{"type": "object"}' in c.skills[0].description


def test_the_settings_give_the_edges_sign_in_its_view_and_read_no_edge_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("MESH_A2A_AUDIENCE", "agents")
    monkeypatch.setenv("MESH_A2A_KEYS_DIR", str(tmp_path))
    monkeypatch.setenv("MESH_A2A_PUSH_ALLOWED_HOSTS", '["hooks.example.com"]')
    monkeypatch.setenv("MESH_EDGE_AUDIENCE", "edge-only")
    settings = A2aSettings()
    edge = settings.as_edge()
    assert (edge.audience, edge.keys_dir, settings.push_allowed_hosts) == ("agents", tmp_path, ["hooks.example.com"])
    assert A2aSettings.env_names("max_tasks_per_user") == ("MESH_A2A_MAX_TASKS_PER_USER",)
