"""The calls ``tierpick label`` pays for: a tier's answer from an OpenAI-compatible
chat/completions endpoint, and its grade (an LLM judge's 1-10 in MT-Bench's single-answer
format, or the team's own grader command).

Every call is retried on HTTP 429 and 5xx, on a timeout and on a lost connection, with
exponential backoff and jitter (``Retry-After`` is honoured, up to a minute); any other 4xx is
final. A failure is a :class:`CallFailed` with a reason fit to record: HTTP status and the
server's message, cut short, with every API key in play blanked out.
"""

from __future__ import annotations

import json
import logging
import random
import re
import subprocess
import threading
from dataclasses import dataclass
from typing import Any

from tierpick.classifier.errors import MissingDependencyError, TierpickError
from tierpick.serving.label.config import Endpoint, Judge, RequestSettings

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
MAX_REASON = 300

# MT-Bench's single-answer grading prompts (FastChat llm_judge: single-v1, and single-math-v1
# when a reference answer is known)
JUDGE_SYSTEM = "You are a helpful assistant."
JUDGE_PROMPT = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response "
    "provided by an AI assistant to the user question displayed below. Your evaluation should "
    "consider factors such as the helpfulness, relevance, accuracy, depth, creativity, and level "
    "of detail of the response. Begin your evaluation by providing a short explanation. Be as "
    "objective as possible. After providing your explanation, you must rate the response on a "
    'scale of 1 to 10 by strictly following this format: "[[rating]]", for example: "Rating: '
    "[[5]]\".\n\n[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n"
    "[The End of Assistant's Answer]"
)
JUDGE_PROMPT_REFERENCE = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response "
    "provided by an AI assistant to the user question displayed below. Your evaluation should "
    "consider correctness and helpfulness. You will be given a reference answer and the "
    "assistant's answer. Begin your evaluation by comparing the assistant's answer with the "
    "reference answer. Identify and correct any mistakes. Be as objective as possible. After "
    "providing your explanation, you must rate the response on a scale of 1 to 10 by strictly "
    'following this format: "[[rating]]", for example: "Rating: [[5]]".\n\n[Question]\n'
    "{question}\n\n[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]"
    "\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
)
_RATING = re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]")
_RATING_LOOSE = re.compile(r"\[(\d+(?:\.\d+)?)\]")


class CallFailed(TierpickError):
    """A paid call that gave no usable result; ``reason`` is safe to record."""

    def __init__(self, reason: str, cost_usd: float = 0.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.cost_usd = cost_usd  # what it cost anyway (a judge answer without a grade)


@dataclass(frozen=True)
class Answer:
    text: str
    input_tokens: int
    output_tokens: int
    cost_usd: float
    estimated: bool  # token counts estimated from characters: the endpoint gave no usage
    attempts: int


@dataclass(frozen=True)
class Grade:
    score: float  # success in [0, 1]
    grade: float | None  # the judge's 1-10, when an LLM judged
    rationale: str
    cost_usd: float


class Redactor:
    """Blanks out secrets (the API keys in play) from any text that may be recorded."""

    def __init__(self, secrets: list[str]) -> None:
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def __call__(self, text: str, limit: int = MAX_REASON) -> str:
        for s in self.secrets:
            text = text.replace(s, "***")
        return text if len(text) <= limit else text[:limit] + "…"


class Client:
    """One HTTP connection pool for every endpoint (thread-safe), with the retry policy."""

    def __init__(self, request: RequestSettings, redact: Redactor, stop: threading.Event) -> None:
        try:
            import httpx
        except ImportError as exc:
            raise MissingDependencyError(
                f"tierpick label needs httpx (pip install 'tierpick[label]'): {exc}"
            ) from exc
        self.httpx = httpx
        logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per call
        self.request, self.redact, self.stop = request, redact, stop
        self.http = httpx.Client(
            timeout=httpx.Timeout(request.timeout_s, connect=min(10.0, request.timeout_s)),
            limits=httpx.Limits(max_connections=request.concurrency * 2),
        )

    def close(self) -> None:
        self.http.close()

    def chat(
        self,
        endpoint: Endpoint,
        key: str | None,
        messages: list[dict[str, str]],
        max_tokens: int,
    ) -> Answer:
        """One chat completion, retried as the module says.

        Raises:
            CallFailed: every attempt failed, or a final 4xx, or an answer without text.
        """
        body = {
            "model": endpoint.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": self.request.temperature,
        }
        headers = {"authorization": f"Bearer {key}"} if key else {}
        url = endpoint.base_url + "/chat/completions"
        retries = self.request.retries
        for attempt in range(retries + 1):
            wait: float | None = None
            try:
                resp = self.http.post(url, json=body, headers=headers)
            except self.httpx.TimeoutException:
                reason = f"timed out after {self.request.timeout_s:g} s"
            except self.httpx.TransportError as exc:
                reason = f"connection failed ({type(exc).__name__}: {exc})"
            else:
                if resp.status_code == 200:
                    return self._answer(endpoint, resp, messages, attempt + 1)
                reason = f"HTTP {resp.status_code}: {_message(resp)}"
                if resp.status_code not in RETRY_STATUS:
                    raise CallFailed(self.redact(reason))
                wait = _retry_after(resp.headers.get("retry-after"))
            if attempt == retries or self.stop.is_set():
                break
            backoff = min(30.0, 0.5 * 2**attempt) * (0.5 + random.random())
            if self.stop.wait(backoff if wait is None else max(backoff, wait)):
                break
        raise CallFailed(self.redact(f"{reason} (after {attempt + 1} attempts)"))

    def _answer(
        self, endpoint: Endpoint, resp: Any, messages: list[dict[str, str]], attempts: int
    ) -> Answer:
        try:
            data = resp.json()
            text = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise CallFailed(
                self.redact(f"answer is not an OpenAI chat completion ({type(exc).__name__})")
            ) from None
        if not isinstance(text, str) or not text.strip():
            raise CallFailed("the answer is empty")
        usage = data.get("usage") if isinstance(data, dict) else None
        tin = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        tout = usage.get("completion_tokens") if isinstance(usage, dict) else None
        estimated = not (isinstance(tin, int) and isinstance(tout, int))
        if estimated:  # no usage: characters / 4, the rule the cost reports use
            tin = sum(len(m["content"]) for m in messages) // 4 + 1
            tout = len(text) // 4 + 1
        assert isinstance(tin, int) and isinstance(tout, int)
        return Answer(text, tin, tout, endpoint.cost(tin, tout), estimated, attempts)


def _message(resp: Any) -> str:
    """The error message of an OpenAI-style error body, else the start of the body."""
    try:
        data = resp.json()
        msg = data.get("error", {}).get("message") if isinstance(data, dict) else None
        if isinstance(msg, str):
            return msg
    except ValueError:
        pass
    return str(resp.text)[:MAX_REASON]


def _retry_after(value: str | None) -> float | None:
    try:
        return min(60.0, max(0.0, float(value))) if value is not None else None
    except ValueError:
        return None


def judge_answer(
    client: Client,
    judge: Judge,
    key: str | None,
    question: str,
    answer: str,
    reference: str | None,
    tier: str,
    model: str,
) -> Grade:
    """Grade one answer with the configured judge.

    Raises:
        CallFailed: the judge failed, or gave no grade (the cost is kept on the exception).
    """
    if judge.command:
        return run_grader(judge, question, answer, reference, tier, model, client.redact)
    assert judge.endpoint is not None
    template = JUDGE_PROMPT_REFERENCE if reference else JUDGE_PROMPT
    prompt = template.format(question=question, answer=answer, reference=reference)
    messages = [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": prompt}]
    out = client.chat(judge.endpoint, key, messages, judge.max_tokens)
    match = _RATING.search(out.text) or _RATING_LOOSE.search(out.text)
    grade = float(match.group(1)) if match else None
    if grade is None or not 1.0 <= grade <= 10.0:
        raise CallFailed(
            client.redact(
                "the judge's answer holds no [[rating]] from 1 to 10: "
                + repr(out.text.strip()[-120:])
            ),
            out.cost_usd,
        )
    score = 1.0 if grade >= judge.pass_grade else 0.0
    return Grade(score, grade, client.redact(out.text, 4000), out.cost_usd)


def run_grader(
    judge: Judge,
    question: str,
    answer: str,
    reference: str | None,
    tier: str,
    model: str,
    redact: Redactor,
) -> Grade:
    """The team's grader: ``judge.command`` gets one JSON object on stdin (``prompt``,
    ``answer``, ``reference``, ``tier``, ``model``) and prints a score in [0, 1], as a number
    or as ``{"score": s, "rationale": "..."}``; a non-zero exit, a time-out or anything else
    printed is a failure with its reason."""
    payload = json.dumps(
        {"prompt": question, "answer": answer, "reference": reference, "tier": tier, "model": model}
    )
    try:
        proc = subprocess.run(
            list(judge.command),
            input=payload,
            capture_output=True,
            text=True,
            timeout=judge.timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise CallFailed(f"grader command timed out after {judge.timeout_s:g} s") from None
    except OSError as exc:
        raise CallFailed(f"grader command could not run: {exc.strerror or exc}") from None
    if proc.returncode != 0:
        raise CallFailed(
            redact(f"grader command exited {proc.returncode}: {proc.stderr.strip()[-200:]}")
        )
    out = proc.stdout.strip()
    try:
        value = json.loads(out)
    except ValueError:
        value = None
    score = value.get("score") if isinstance(value, dict) else value
    rationale = value.get("rationale", "") if isinstance(value, dict) else ""
    if (
        isinstance(score, bool)
        or not isinstance(score, int | float)
        or not 0.0 <= float(score) <= 1.0
    ):
        raise CallFailed(redact(f"grader command printed no score in [0, 1]: {out[:120]!r}"))
    return Grade(float(score), None, redact(str(rationale), 4000), 0.0)
