"""The torch-free runtime: loading, verification, probabilities and routing policies."""

import itertools
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DATA
from tierpick import classifier
from tierpick.classifier import ArtifactError, PolicyError, RoutingPolicy
from tierpick.classifier.runtime import prepare_prompt


@pytest.fixture(scope="module")
def model_dir(tiny_trained) -> Path:  # type: ignore[no-untyped-def]
    return Path(tiny_trained.model_dir)


def test_predict_proba_shape_and_range(model_dir: Path) -> None:
    clf = classifier.load(model_dir)
    assert clf.tiers == ("local", "mid", "frontier")
    p = clf.predict_proba(["What is 2 + 2?", "Prove the Riemann hypothesis.", "x" * 100_000])
    assert p.shape == (3, 3) and p.dtype == np.float32
    assert ((p > 0) & (p < 1)).all()
    assert clf.predict_proba([]).shape == (0, 3)
    with pytest.raises(TypeError):
        clf.predict_proba("one string")  # type: ignore[arg-type]
    # batch and single-prompt paths agree
    single = np.vstack([clf.predict_proba([q]) for q in ("a b c", "What is 2 + 2?")])
    assert np.allclose(single, clf.predict_proba(["a b c", "What is 2 + 2?"]), atol=1e-6)


def test_routing_policies(model_dir: Path) -> None:
    from tierpick.classifier.routing import normalized_costs

    clf = classifier.load(model_dir)
    prompts = ["What is 2 + 2?", "Compute the Lebesgue integral of x^2 over the Cantor set."]
    p = clf.predict_proba(prompts)
    # threshold rule: nothing reaches 1.0, so the dearest allowed tier is the fallback
    top = clf.route(prompts, RoutingPolicy(min_success=1.0))
    assert [d.tier for d in top] == ["frontier", "frontier"] and not top[0].met_threshold
    low = clf.route(prompts, RoutingPolicy(min_success=1e-6))
    assert [d.tier for d in low] == ["local", "local"] and low[0].met_threshold
    # utility rule (the default): best probability - cost_weight x normalized cost
    costs = normalized_costs([0, 0.5, 5], [0, 1.5, 15])
    w = clf.manifest.default_cost_weight
    for d, row in zip(clf.route_proba(p), p, strict=True):
        assert d.tier == clf.tiers[int(np.argmax(row - w * costs))]
        assert d.probabilities == pytest.approx(dict(zip(clf.tiers, row.tolist(), strict=True)))
    free = clf.route_proba(p, RoutingPolicy(cost_weight=0.0))
    assert [d.tier for d in free] == [clf.tiers[int(np.argmax(row))] for row in p]
    thrifty = clf.route_proba(p, RoutingPolicy(cost_weight=1e9))
    assert {d.tier for d in thrifty} == {"local"}
    only_cheap = clf.route(prompts, RoutingPolicy(min_success=1.0, allowed_tiers=("local", "mid")))
    assert {d.tier for d in only_cheap} == {"mid"}
    capped = clf.route(prompts, RoutingPolicy(min_success=1.0, max_price=1.5))
    assert {d.tier for d in capped} == {"mid"}
    capped_utility = clf.route(prompts, RoutingPolicy(cost_weight=0.0, max_price=0.0))
    assert {d.tier for d in capped_utility} == {"local"}


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (RoutingPolicy(min_success=1.5), "min_success must be in [0, 1]"),
        (RoutingPolicy(allowed_tiers=("gold",)), "unknown tier(s) ['gold']"),
        (RoutingPolicy(max_price=-1), "max_price must be >= 0"),
        (RoutingPolicy(cost_weight=-0.5), "cost_weight must be >= 0"),
        (RoutingPolicy(allowed_tiers=("frontier",), max_price=1.0), "no tier is allowed"),
    ],
)
def test_bad_policies(model_dir: Path, policy: RoutingPolicy, message: str) -> None:
    clf = classifier.load(model_dir)
    with pytest.raises(PolicyError) as info:
        clf.route(["hi"], policy)
    assert message in str(info.value)


def test_every_policy_routes_within_its_allowed_tiers_or_is_refused(model_dir: Path) -> None:
    """inf x a zero cost is NaN: cost_weight=inf once routed to a tier outside allowed_tiers."""
    import math

    clf = classifier.load(model_dir)
    p = clf.predict_proba(["What is 2 + 2?", "Prove that there are infinitely many primes."])
    odd = [0.0, 1e-12, 0.5, 1.0, 1e300, math.inf, -math.inf, math.nan, -0.0, -1.0]
    subsets = [(), ("frontier",), ("local",), ("mid", "frontier"), ("local", "frontier")]
    refused = 0
    for weight, minimum, price, allowed in itertools.product(odd, odd, [None, *odd], subsets):
        policy = RoutingPolicy(
            min_success=minimum, allowed_tiers=allowed, max_price=price, cost_weight=weight
        )
        try:
            decisions = clf.route_proba(p, policy)
        except PolicyError:
            refused += 1
            continue
        ok = set(allowed or clf.tiers)
        if price is not None:
            ok &= {t.name for t in clf.manifest.tiers if t.price_output <= price}
        assert {d.tier for d in decisions} <= ok, policy
        assert math.isfinite(weight) and 0 <= minimum <= 1
    assert refused > 0
    for bad in (math.inf, math.nan):
        with pytest.raises(PolicyError, match="cost_weight must be >= 0 and finite"):
            clf.route(["hi"], RoutingPolicy(cost_weight=bad, allowed_tiers=("frontier",)))


def test_knob_ranges_say_which_setting_would_choose_each_tier(model_dir: Path) -> None:
    """``Router.knob_ranges`` (``classify``'s "chosen at" column) against the router itself: a
    knob value inside a tier's range chooses that tier, the ranges tile the knob's whole span,
    and a tier with no range is chosen at none of the values probed."""
    clf = classifier.load(model_dir)
    rng = np.random.default_rng(0)
    proba = np.vstack(
        [
            clf.predict_proba(["hi", "What is 2+2?", "Prove the Riemann hypothesis."]),
            rng.uniform(size=(20, 3)),
            [[0.5, 0.5, 0.5], [0.9, 0.2, 0.1], [0.2, 0.2, 0.9]],  # ties and inversions
        ]
    )
    probe_w = np.concatenate([[0.0], np.geomspace(1e-4, 1e4, 150)])
    probe_t = np.linspace(0.005, 1.0, 150)
    for policy, probes, field in [
        (RoutingPolicy(), probe_w, "cost_weight"),
        (RoutingPolicy(allowed_tiers=("local", "frontier")), probe_w, "cost_weight"),
        (RoutingPolicy(min_success=0.5), probe_t, "min_success"),
        (RoutingPolicy(min_success=0.5, allowed_tiers=("mid", "frontier")), probe_t, "min_success"),
    ]:
        for p in proba:
            router = clf.router(policy)
            assert router.knob == field
            ranges = router.knob_ranges(p)
            spans = sorted(r for r in ranges if r is not None)
            top = 1.0 if field == "min_success" else np.inf
            assert spans[0][0] == 0.0 and spans[-1][1] == top
            assert all(a[1] == b[0] for a, b in itertools.pairwise(spans)), spans
            for v in probes:
                chosen = replace(router, **{field: float(v)}).choose(p[None, :])[0][0]
                inside = [
                    j
                    for j, r in enumerate(ranges)
                    if r is not None
                    and (r[0] < v <= r[1] if field == "min_success" else r[0] <= v < r[1])
                ]
                assert inside == [chosen], (policy, p, v, ranges)


def test_prompt_with_nothing_left_once_normalized_is_refused(model_dir: Path) -> None:
    from tierpick.classifier import PromptError

    clf = classifier.load(model_dir)
    for junk in ("\u200b\u200c\u200d\ufeff", "\x00\x01\x7f", " \t\n\r ", "\u2060" * 1000):
        with pytest.raises(PromptError, match="prompt 1 has no text once normalized"):
            clf.predict_proba(["fine", junk])
        assert clf.prepare([junk]) == [""]
    # the work per prompt is bounded: only 4 x max_chars raw characters are read
    m = clf.manifest.max_chars
    assert prepare_prompt("a" * 10 + "b" * 20_000_000, m) == "a" * 10 + "b" * (m - 10)
    assert prepare_prompt(" " * (4 * m) + "hello", m) == ""
    assert prepare_prompt(" " * (4 * m - 5) + "hello", m) == "hello"


def test_tampered_or_incomplete_artifacts_are_refused(model_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "m"
    shutil.copytree(model_dir, bad)
    with (bad / "student.onnx").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ArtifactError, match=r"student\.onnx fails its checksum"):
        classifier.load(bad)
    shutil.copy(model_dir / "student.onnx", bad / "student.onnx")
    classifier.load(bad)  # restored: loads again
    (bad / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match=r"tokenizer\.json listed in the manifest is missing"):
        classifier.load(bad)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    shutil.copy(model_dir / "tokenizer.json", bad / "tokenizer.json")
    (bad / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(ArtifactError, match="schema_version 99 is not supported"):
        classifier.load(bad)
    (bad / "manifest.json").write_text("{")
    with pytest.raises(ArtifactError, match="not JSON"):
        classifier.load(bad)
    (bad / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match=r"no manifest\.json"):
        classifier.load(bad)
    with pytest.raises(ArtifactError, match="does not exist"):
        classifier.load(tmp_path / "nowhere")


@pytest.mark.parametrize("escape", ["../secret.txt", "/etc/passwd", "sub/student.onnx", ".."])
def test_manifest_paths_never_leave_the_model_directory(
    model_dir: Path, tmp_path: Path, escape: str
) -> None:
    """A manifest naming a file outside its directory is refused before anything is read (the
    error once printed part of an outside file's sha256)."""
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    bad = tmp_path / "m"
    shutil.copytree(model_dir, bad)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    for field in ("files", "graph"):
        edited = dict(manifest)
        if field == "files":
            edited["files"] = {**manifest["files"], escape: "0" * 64}
        else:
            edited["files"] = {**manifest["files"], escape: manifest["files"]["student.onnx"]}
            edited["graph"] = escape
        (bad / "manifest.json").write_text(json.dumps(edited))
        with pytest.raises(
            ArtifactError, match="is not a plain name inside the model directory"
        ) as info:
            classifier.load(bad)
        assert "sha256" not in str(info.value)


def test_runtime_never_imports_torch(model_dir: Path) -> None:
    code = (
        "import sys, classifier\n"
        f"clf = classifier.load({str(model_dir)!r})\n"
        "clf.route(['hello'])\n"
        "bad = [m for m in ('torch', 'transformers', 'training', 'sklearn', 'mlflow') "
        "if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


EDGE_CASES = [
    "plain lower case words",
    "UPPER Case, punctuation!? (brackets) [square] {curly} under_score a-b a.b",
    "a literal [MASK] and [SEP] in the text",
    "tab\tnewline\ncarriage\rreturn",
    "vertical\x0btab and form\x0cfeed and \x00 nul",
    "x" * 150 + " a word longer than WordPiece's 100 characters",
    "naïve café, Ünïcödé and 中文 and emoji 🎉",
    "numbers 3.14159 and 1,000,000 and 0x1F and snake_case_name",
    " ".join(["token"] * 400),  # truncated at max_tokens
    "#" * 300,
]


@pytest.mark.parametrize("which", ["shipped", "tiny"])
def test_fast_tokenizer_path_gives_the_library_ids(
    which: str, model_dir: Path, tiny_data: Path
) -> None:
    """The ASCII fast path must reproduce the tokenizers library exactly, or the served model
    would see other inputs than it was trained on."""
    clf = classifier.load(None if which == "shipped" else model_dir)
    prompts = [json.loads(x)["prompt"] for x in tiny_data.read_text().splitlines()]
    with (DATA / "prompt-logs" / "arena-hard-v0.1-question.jsonl").open() as fh:
        prompts += [json.loads(x)["prompt"] for x in fh]
    prompts += EDGE_CASES
    fast = clf.token_ids(prompts)
    library = clf.token_ids(prompts, fast_path=False)
    assert fast == library
    assert clf._fast is not None
    taken = [p for p in prompts if clf._fast.ids(prepare_prompt(p, clf.manifest.max_chars))]
    assert len(taken) > 0.75 * len(prompts)  # most real prompts are ASCII: the path is used
    assert clf._fast.ids("naïve") is None and clf._fast.ids("a [MASK]") is None
    assert len(fast[prompts.index(EDGE_CASES[8])]) == clf.manifest.max_tokens
