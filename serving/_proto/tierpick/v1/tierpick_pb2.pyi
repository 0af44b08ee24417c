from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class RoutingPolicy(_message.Message):
    __slots__ = ("min_success", "allowed_tiers", "max_price", "cost_weight", "sticky")
    MIN_SUCCESS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_TIERS_FIELD_NUMBER: _ClassVar[int]
    MAX_PRICE_FIELD_NUMBER: _ClassVar[int]
    COST_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    STICKY_FIELD_NUMBER: _ClassVar[int]
    min_success: float
    allowed_tiers: _containers.RepeatedScalarFieldContainer[str]
    max_price: float
    cost_weight: float
    sticky: bool
    def __init__(self, min_success: _Optional[float] = ..., allowed_tiers: _Optional[_Iterable[str]] = ..., max_price: _Optional[float] = ..., cost_weight: _Optional[float] = ..., sticky: _Optional[bool] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("prompt", "messages", "policy", "request_id", "conversation_id")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    policy: RoutingPolicy
    request_id: str
    conversation_id: str
    def __init__(self, prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., policy: _Optional[_Union[RoutingPolicy, _Mapping]] = ..., request_id: _Optional[str] = ..., conversation_id: _Optional[str] = ...) -> None: ...

class TierScore(_message.Message):
    __slots__ = ("tier", "success_probability", "price_input", "price_output", "allowed", "utility")
    TIER_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    PRICE_INPUT_FIELD_NUMBER: _ClassVar[int]
    PRICE_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    UTILITY_FIELD_NUMBER: _ClassVar[int]
    tier: str
    success_probability: float
    price_input: float
    price_output: float
    allowed: bool
    utility: float
    def __init__(self, tier: _Optional[str] = ..., success_probability: _Optional[float] = ..., price_input: _Optional[float] = ..., price_output: _Optional[float] = ..., allowed: _Optional[bool] = ..., utility: _Optional[float] = ...) -> None: ...

class DecisionBasis(_message.Message):
    __slots__ = ("rule", "cost_weight", "min_success", "prompt_cut", "held_by_conversation")
    RULE_FIELD_NUMBER: _ClassVar[int]
    COST_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MIN_SUCCESS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_CUT_FIELD_NUMBER: _ClassVar[int]
    HELD_BY_CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    rule: str
    cost_weight: float
    min_success: float
    prompt_cut: bool
    held_by_conversation: bool
    def __init__(self, rule: _Optional[str] = ..., cost_weight: _Optional[float] = ..., min_success: _Optional[float] = ..., prompt_cut: _Optional[bool] = ..., held_by_conversation: _Optional[bool] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("tier", "scores", "model_version", "request_id", "met_threshold", "basis", "familiarity")
    TIER_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MET_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    BASIS_FIELD_NUMBER: _ClassVar[int]
    FAMILIARITY_FIELD_NUMBER: _ClassVar[int]
    tier: str
    scores: _containers.RepeatedCompositeFieldContainer[TierScore]
    model_version: str
    request_id: str
    met_threshold: bool
    basis: DecisionBasis
    familiarity: float
    def __init__(self, tier: _Optional[str] = ..., scores: _Optional[_Iterable[_Union[TierScore, _Mapping]]] = ..., model_version: _Optional[str] = ..., request_id: _Optional[str] = ..., met_threshold: _Optional[bool] = ..., basis: _Optional[_Union[DecisionBasis, _Mapping]] = ..., familiarity: _Optional[float] = ...) -> None: ...

class ClassifyBatchRequest(_message.Message):
    __slots__ = ("requests", "policy")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[ClassifyRequest]
    policy: RoutingPolicy
    def __init__(self, requests: _Optional[_Iterable[_Union[ClassifyRequest, _Mapping]]] = ..., policy: _Optional[_Union[RoutingPolicy, _Mapping]] = ...) -> None: ...

class ClassifyBatchResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[ClassifyResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[ClassifyResponse, _Mapping]]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("with_evaluation",)
    WITH_EVALUATION_FIELD_NUMBER: _ClassVar[int]
    with_evaluation: bool
    def __init__(self, with_evaluation: _Optional[bool] = ...) -> None: ...

class TierInfo(_message.Message):
    __slots__ = ("name", "price_input", "price_output")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PRICE_INPUT_FIELD_NUMBER: _ClassVar[int]
    PRICE_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    name: str
    price_input: float
    price_output: float
    def __init__(self, name: _Optional[str] = ..., price_input: _Optional[float] = ..., price_output: _Optional[float] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_name", "model_version", "tiers", "evaluation", "default_cost_weight", "max_batch", "max_prompt_chars", "data_fingerprint", "active_policy")
    class EvaluationEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_COST_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_CHARS_FIELD_NUMBER: _ClassVar[int]
    DATA_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_POLICY_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    tiers: _containers.RepeatedCompositeFieldContainer[TierInfo]
    evaluation: _containers.ScalarMap[str, float]
    default_cost_weight: float
    max_batch: int
    max_prompt_chars: int
    data_fingerprint: str
    active_policy: str
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., tiers: _Optional[_Iterable[_Union[TierInfo, _Mapping]]] = ..., evaluation: _Optional[_Mapping[str, float]] = ..., default_cost_weight: _Optional[float] = ..., max_batch: _Optional[int] = ..., max_prompt_chars: _Optional[int] = ..., data_fingerprint: _Optional[str] = ..., active_policy: _Optional[str] = ...) -> None: ...
