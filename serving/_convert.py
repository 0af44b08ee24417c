"""Proto messages <-> domain objects, in one place: the servicer stays thin."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tierpick.classifier import RoutingPolicy, TierClassifier
from tierpick.classifier.errors import RequestError
from tierpick.classifier.routing import POLICY_FIELDS, POLICY_KEYS, overlay
from tierpick.serving._proto.tierpick.v1 import tierpick_pb2 as pb
from tierpick.serving.conversations import Conversations, conversation_key
from tierpick.serving.decisions import DecisionLog, policy_fields
from tierpick.serving.guard import BudgetGuard


def request_prompt(req: pb.ClassifyRequest, clf: TierClassifier) -> str:
    """The text to classify: ``prompt``, or of ``messages`` the last user turn with text of its
    own, then the user turns before it as far as the model reads
    (:meth:`~tierpick.classifier.TierClassifier.chat_text`)."""
    if req.prompt and req.messages:
        raise RequestError("give prompt or messages, not both")
    if req.messages:
        try:
            text = clf.chat_text([{"role": m.role, "content": m.content} for m in req.messages])
        except ValueError as exc:
            raise RequestError(f"messages: {exc}") from exc
    else:
        text = req.prompt
    if not text.strip():  # the model normalizes once, later; this only refuses blank input
        raise RequestError("prompt is empty or only white space")
    return text


def to_policy(msg: pb.RoutingPolicy | None, base: RoutingPolicy) -> RoutingPolicy:
    """The request's policy over the server's (``tierpick serve --policy``): each field the
    request sets replaces the server's (``min_success`` when > 0, ``allowed_tiers`` when not
    empty, ``max_price`` and ``cost_weight`` when present)."""
    if msg is None:
        return base
    values = {}
    for f in POLICY_FIELDS:  # proto field = policy field; set = present, or non-zero, non-empty
        value = getattr(msg, f.name)
        present = msg.HasField(f.name) if f.name in _OPTIONAL else bool(value)
        if present:
            values[f.name] = tuple(value) if f.tiers else value
    return overlay(base, values)


# the proto's `optional` fields (presence tracked); the others count when non-zero/non-empty
_OPTIONAL = {
    field.name
    for field in pb.RoutingPolicy.DESCRIPTOR.fields
    if field.has_presence and field.name in POLICY_KEYS
}


def classify(
    clf: TierClassifier,
    requests: Sequence[pb.ClassifyRequest],
    default: pb.RoutingPolicy | None,
    base: RoutingPolicy | None = None,
    decisions: DecisionLog | None = None,
    conversations: Conversations | None = None,
    guard: BudgetGuard | None = None,
    familiarity: bool = True,
) -> list[pb.ClassifyResponse]:
    """Validate every request first (nothing is computed for a bad batch), then predict once.

    A request's policy is its own, else the batch's ``default``, laid over the server's
    ``base`` policy (see :func:`to_policy`). Under a sticky policy, ``conversations`` holds
    each conversation's tier (:mod:`~tierpick.serving.conversations`). Each decision goes to
    ``decisions`` when given. With a ``guard``, the server's policy routes at the guard's cost
    weight, and the requests routed by it are what the guard observes. ``familiarity``: say
    how far each prompt is from the training data (about 50 us more a prompt)."""
    base = base or RoutingPolicy()
    if guard is not None:
        base = guard.policy(base)
    prompts = [request_prompt(r, clf) for r in requests]
    policies = [to_policy(r.policy if r.HasField("policy") else default, base) for r in requests]
    keys = [
        conversation_key(
            r.conversation_id, [{"role": m.role, "content": m.content} for m in r.messages]
        )
        if p.sticky
        else None
        for r, p in zip(requests, policies, strict=True)
    ]
    groups: dict[RoutingPolicy, list[int]] = {}
    for i, p in enumerate(policies):
        groups.setdefault(p, []).append(i)
    # validated once per distinct policy (a batch usually shares one), before any inference
    routers = {p: clf.router(p) for p in groups}
    reading = clf.read(prompts, familiarity=familiarity)
    proba = reading.proba
    chosen = np.zeros(len(requests), dtype=np.int64)
    met = np.ones(len(requests), dtype=bool)
    utility = np.zeros(proba.shape, dtype=np.float64)
    for p, rows in groups.items():  # one vectorized pass per distinct policy
        chosen[rows], met[rows] = routers[p].choose(proba[rows])
        utility[rows] = routers[p].utilities(proba[rows])
    if guard is not None and base in groups:
        rows = groups[base]
        chars = [len(prompts[i]) for i in rows]
        guard.record(chars, proba[rows], chosen[rows], routers[base], clf.manifest.tiers)
    held = np.zeros(len(requests), dtype=bool)
    if conversations is not None:
        for i, key in enumerate(keys):
            if key is not None:
                tier, held[i] = conversations.hold(
                    key, int(chosen[i]), routers[policies[i]].allowed
                )
                chosen[i] = tier
    tiers = clf.manifest.tiers
    if decisions is not None:
        for i, r in enumerate(requests):
            decisions.record(
                door="grpc",
                mode="route",
                prompt=prompts[i],
                tiers=clf.tiers,
                proba=proba[i],
                tier=clf.tiers[int(chosen[i])],
                model_version=clf.version,
                policy=policy_fields(routers[policies[i]]),
                request_id=r.request_id,
            )
    out = []
    for i, r in enumerate(requests):
        router = routers[policies[i]]
        out.append(
            pb.ClassifyResponse(
                tier=clf.tiers[int(chosen[i])],
                scores=[
                    pb.TierScore(
                        tier=t.name,
                        success_probability=float(p),
                        price_input=t.price_input,
                        price_output=t.price_output,
                        allowed=bool(ok),
                        utility=float(u) if ok else 0.0,
                    )
                    for t, p, ok, u in zip(tiers, proba[i], router.allowed, utility[i], strict=True)
                ],
                model_version=clf.version,
                request_id=r.request_id,
                met_threshold=bool(met[i]),
                basis=pb.DecisionBasis(
                    rule=router.rule,
                    cost_weight=router.cost_weight,
                    min_success=router.min_success,
                    prompt_cut=reading.cut[i],
                    held_by_conversation=bool(held[i]),
                ),
                familiarity=None if reading.familiarity is None else float(reading.familiarity[i]),
            )
        )
    return out


# The figures GetModelInfo returns unless asked for all (a model records a few hundred)
HEADLINE_FIGURES = (
    "test_student_apgr",
    "test_student_mean_auc",
    "ood_student_apgr",
    "ood_student_mean_auc",
    "loso_student_mean_apgr",
    "loso_best_fixed_mix_mean_apgr",
    "adapt_n_tier_apgr",
    "adapt_mean_ece",
    "adapt_parent_n_tier_apgr",
    "adapt_parent_mean_ece",
    "int8_max_abs_prob_diff",
)


def model_info(clf: TierClassifier, max_batch: int, with_evaluation: bool = False) -> pb.ModelInfo:
    m = clf.manifest
    figures = {
        k: float(v) for k, v in m.evaluation.items() if with_evaluation or k in HEADLINE_FIGURES
    }
    return pb.ModelInfo(
        model_name=m.model_name,
        model_version=m.model_version,
        tiers=[
            pb.TierInfo(name=t.name, price_input=t.price_input, price_output=t.price_output)
            for t in m.tiers
        ],
        evaluation=figures,
        default_cost_weight=m.default_cost_weight,
        max_batch=max_batch,
        max_prompt_chars=m.max_chars,
        data_fingerprint=m.data_fingerprint,
    )
