from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MixtureMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MIXTURE_MODE_UNSPECIFIED: _ClassVar[MixtureMode]
    MIXTURE_MODE_UNIFORM: _ClassVar[MixtureMode]
    MIXTURE_MODE_POSTERIOR: _ClassVar[MixtureMode]

class NodeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_STATE_UNSPECIFIED: _ClassVar[NodeState]
    NODE_STATE_REGISTERED: _ClassVar[NodeState]
    NODE_STATE_HEALTHY: _ClassVar[NodeState]
    NODE_STATE_DRAINING: _ClassVar[NodeState]
    NODE_STATE_DOWN: _ClassVar[NodeState]

class ByteKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BYTE_KIND_UNSPECIFIED: _ClassVar[ByteKind]
    BYTE_KIND_BUNDLE: _ClassVar[ByteKind]
    BYTE_KIND_ADAPTER: _ClassVar[ByteKind]
    BYTE_KIND_SCORE: _ClassVar[ByteKind]
    BYTE_KIND_MIXTURE: _ClassVar[ByteKind]
    BYTE_KIND_GENERATE: _ClassVar[ByteKind]
    BYTE_KIND_CONTROL: _ClassVar[ByteKind]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_CONTEXT: _ClassVar[FinishReason]
MIXTURE_MODE_UNSPECIFIED: MixtureMode
MIXTURE_MODE_UNIFORM: MixtureMode
MIXTURE_MODE_POSTERIOR: MixtureMode
NODE_STATE_UNSPECIFIED: NodeState
NODE_STATE_REGISTERED: NodeState
NODE_STATE_HEALTHY: NodeState
NODE_STATE_DRAINING: NodeState
NODE_STATE_DOWN: NodeState
BYTE_KIND_UNSPECIFIED: ByteKind
BYTE_KIND_BUNDLE: ByteKind
BYTE_KIND_ADAPTER: ByteKind
BYTE_KIND_SCORE: ByteKind
BYTE_KIND_MIXTURE: ByteKind
BYTE_KIND_GENERATE: ByteKind
BYTE_KIND_CONTROL: ByteKind
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_CONTEXT: FinishReason

class BundleRef(_message.Message):
    __slots__ = ("name", "size", "sha256", "model", "codec")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    sha256: bytes
    model: str
    codec: str
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[bytes] = ..., model: _Optional[str] = ..., codec: _Optional[str] = ...) -> None: ...

class ByteRange(_message.Message):
    __slots__ = ("bundle", "offset", "length")
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    bundle: str
    offset: int
    length: int
    def __init__(self, bundle: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class KindBytes(_message.Message):
    __slots__ = ("kind", "sent", "received", "messages", "payload")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SENT_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    kind: ByteKind
    sent: int
    received: int
    messages: int
    payload: int
    def __init__(self, kind: _Optional[_Union[ByteKind, str]] = ..., sent: _Optional[int] = ..., received: _Optional[int] = ..., messages: _Optional[int] = ..., payload: _Optional[int] = ...) -> None: ...

class MixtureComponent(_message.Message):
    __slots__ = ("specialist", "node_id", "adapter_user_id")
    SPECIALIST_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_USER_ID_FIELD_NUMBER: _ClassVar[int]
    specialist: str
    node_id: str
    adapter_user_id: str
    def __init__(self, specialist: _Optional[str] = ..., node_id: _Optional[str] = ..., adapter_user_id: _Optional[str] = ...) -> None: ...

class MixtureSpec(_message.Message):
    __slots__ = ("components", "mode", "prior")
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PRIOR_FIELD_NUMBER: _ClassVar[int]
    components: _containers.RepeatedCompositeFieldContainer[MixtureComponent]
    mode: MixtureMode
    prior: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, components: _Optional[_Iterable[_Union[MixtureComponent, _Mapping]]] = ..., mode: _Optional[_Union[MixtureMode, str]] = ..., prior: _Optional[_Iterable[float]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("user_id", "text", "mixture", "use_base", "omit_token_strings")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MIXTURE_FIELD_NUMBER: _ClassVar[int]
    USE_BASE_FIELD_NUMBER: _ClassVar[int]
    OMIT_TOKEN_STRINGS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    text: str
    mixture: MixtureSpec
    use_base: bool
    omit_token_strings: bool
    def __init__(self, user_id: _Optional[str] = ..., text: _Optional[str] = ..., mixture: _Optional[_Union[MixtureSpec, _Mapping]] = ..., use_base: _Optional[bool] = ..., omit_token_strings: _Optional[bool] = ...) -> None: ...

class ComponentScore(_message.Message):
    __slots__ = ("component", "node_id", "logprobs", "attribution", "final_weight", "perplexity")
    COMPONENT_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    FINAL_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    component: MixtureComponent
    node_id: str
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    attribution: _containers.RepeatedScalarFieldContainer[float]
    final_weight: float
    perplexity: float
    def __init__(self, component: _Optional[_Union[MixtureComponent, _Mapping]] = ..., node_id: _Optional[str] = ..., logprobs: _Optional[_Iterable[float]] = ..., attribution: _Optional[_Iterable[float]] = ..., final_weight: _Optional[float] = ..., perplexity: _Optional[float] = ...) -> None: ...

class ScoreReply(_message.Message):
    __slots__ = ("user_id", "node_id", "model", "token_ids", "tokens", "logprobs", "perplexity", "bits_per_char", "scored_chars", "components", "failed_over")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    BITS_PER_CHAR_FIELD_NUMBER: _ClassVar[int]
    SCORED_CHARS_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    FAILED_OVER_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    node_id: str
    model: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    perplexity: float
    bits_per_char: float
    scored_chars: int
    components: _containers.RepeatedCompositeFieldContainer[ComponentScore]
    failed_over: bool
    def __init__(self, user_id: _Optional[str] = ..., node_id: _Optional[str] = ..., model: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[str]] = ..., logprobs: _Optional[_Iterable[float]] = ..., perplexity: _Optional[float] = ..., bits_per_char: _Optional[float] = ..., scored_chars: _Optional[int] = ..., components: _Optional[_Iterable[_Union[ComponentScore, _Mapping]]] = ..., failed_over: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("user_id", "prompt", "max_new_tokens", "temperature", "top_k", "seed", "mixture", "use_base", "wire_top_k")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MIXTURE_FIELD_NUMBER: _ClassVar[int]
    USE_BASE_FIELD_NUMBER: _ClassVar[int]
    WIRE_TOP_K_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    prompt: str
    max_new_tokens: int
    temperature: float
    top_k: int
    seed: int
    mixture: MixtureSpec
    use_base: bool
    wire_top_k: int
    def __init__(self, user_id: _Optional[str] = ..., prompt: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., mixture: _Optional[_Union[MixtureSpec, _Mapping]] = ..., use_base: _Optional[bool] = ..., wire_top_k: _Optional[int] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("index", "token_id", "text", "logprob", "node_id", "finish_reason")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    index: int
    token_id: int
    text: str
    logprob: float
    node_id: str
    finish_reason: FinishReason
    def __init__(self, index: _Optional[int] = ..., token_id: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ..., node_id: _Optional[str] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: NodeState
    def __init__(self, state: _Optional[_Union[NodeState, str]] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "address", "state", "last_heartbeat_ms", "model", "bundles", "user_ids", "expert_mask", "n_blocks", "n_experts", "inflight")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BUNDLES_FIELD_NUMBER: _ClassVar[int]
    USER_IDS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_MASK_FIELD_NUMBER: _ClassVar[int]
    N_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    N_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    state: NodeState
    last_heartbeat_ms: int
    model: str
    bundles: _containers.RepeatedScalarFieldContainer[str]
    user_ids: _containers.RepeatedScalarFieldContainer[str]
    expert_mask: bytes
    n_blocks: int
    n_experts: int
    inflight: int
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[_Union[NodeState, str]] = ..., last_heartbeat_ms: _Optional[int] = ..., model: _Optional[str] = ..., bundles: _Optional[_Iterable[str]] = ..., user_ids: _Optional[_Iterable[str]] = ..., expert_mask: _Optional[bytes] = ..., n_blocks: _Optional[int] = ..., n_experts: _Optional[int] = ..., inflight: _Optional[int] = ...) -> None: ...

class ListNodesReply(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ...) -> None: ...

class ListUsersRequest(_message.Message):
    __slots__ = ("persona",)
    PERSONA_FIELD_NUMBER: _ClassVar[int]
    persona: str
    def __init__(self, persona: _Optional[str] = ...) -> None: ...

class UserInfo(_message.Message):
    __slots__ = ("user_id", "persona", "node_id", "has_adapter", "adapter_bytes", "adapter_sha256", "node_state")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PERSONA_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HAS_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_BYTES_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SHA256_FIELD_NUMBER: _ClassVar[int]
    NODE_STATE_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    persona: str
    node_id: str
    has_adapter: bool
    adapter_bytes: int
    adapter_sha256: bytes
    node_state: NodeState
    def __init__(self, user_id: _Optional[str] = ..., persona: _Optional[str] = ..., node_id: _Optional[str] = ..., has_adapter: _Optional[bool] = ..., adapter_bytes: _Optional[int] = ..., adapter_sha256: _Optional[bytes] = ..., node_state: _Optional[_Union[NodeState, str]] = ...) -> None: ...

class ListUsersReply(_message.Message):
    __slots__ = ("users",)
    USERS_FIELD_NUMBER: _ClassVar[int]
    users: _containers.RepeatedCompositeFieldContainer[UserInfo]
    def __init__(self, users: _Optional[_Iterable[_Union[UserInfo, _Mapping]]] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class NodeBytes(_message.Message):
    __slots__ = ("node_id", "by_kind", "total")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    BY_KIND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    by_kind: _containers.RepeatedCompositeFieldContainer[KindBytes]
    total: int
    def __init__(self, node_id: _Optional[str] = ..., by_kind: _Optional[_Iterable[_Union[KindBytes, _Mapping]]] = ..., total: _Optional[int] = ...) -> None: ...

class Stats(_message.Message):
    __slots__ = ("bytes_total", "by_kind", "by_node", "requests_ok", "requests_failed", "requests_shed", "requests_failed_over", "user_id")
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BY_KIND_FIELD_NUMBER: _ClassVar[int]
    BY_NODE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_OK_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FAILED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_SHED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FAILED_OVER_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    bytes_total: int
    by_kind: _containers.RepeatedCompositeFieldContainer[KindBytes]
    by_node: _containers.RepeatedCompositeFieldContainer[NodeBytes]
    requests_ok: int
    requests_failed: int
    requests_shed: int
    requests_failed_over: int
    user_id: str
    def __init__(self, bytes_total: _Optional[int] = ..., by_kind: _Optional[_Iterable[_Union[KindBytes, _Mapping]]] = ..., by_node: _Optional[_Iterable[_Union[NodeBytes, _Mapping]]] = ..., requests_ok: _Optional[int] = ..., requests_failed: _Optional[int] = ..., requests_shed: _Optional[int] = ..., requests_failed_over: _Optional[int] = ..., user_id: _Optional[str] = ...) -> None: ...

class GetAdapterRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class Adapter(_message.Message):
    __slots__ = ("user_id", "format", "data", "sha256")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    format: str
    data: bytes
    sha256: bytes
    def __init__(self, user_id: _Optional[str] = ..., format: _Optional[str] = ..., data: _Optional[bytes] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class PutUserRequest(_message.Message):
    __slots__ = ("user_id", "persona", "adapter", "rotate_token")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PERSONA_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    ROTATE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    persona: str
    adapter: Adapter
    rotate_token: bool
    def __init__(self, user_id: _Optional[str] = ..., persona: _Optional[str] = ..., adapter: _Optional[_Union[Adapter, _Mapping]] = ..., rotate_token: _Optional[bool] = ...) -> None: ...

class PutUserReply(_message.Message):
    __slots__ = ("user", "token")
    USER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    user: UserInfo
    token: str
    def __init__(self, user: _Optional[_Union[UserInfo, _Mapping]] = ..., token: _Optional[str] = ...) -> None: ...

class DeleteUserRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class DeleteUserReply(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class ListBundlesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListBundlesReply(_message.Message):
    __slots__ = ("bundles",)
    BUNDLES_FIELD_NUMBER: _ClassVar[int]
    bundles: _containers.RepeatedCompositeFieldContainer[BundleRef]
    def __init__(self, bundles: _Optional[_Iterable[_Union[BundleRef, _Mapping]]] = ...) -> None: ...

class AssignUserRequest(_message.Message):
    __slots__ = ("user_id", "node_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    node_id: str
    def __init__(self, user_id: _Optional[str] = ..., node_id: _Optional[str] = ...) -> None: ...

class AssignUserReply(_message.Message):
    __slots__ = ("user", "bytes_shipped")
    USER_FIELD_NUMBER: _ClassVar[int]
    BYTES_SHIPPED_FIELD_NUMBER: _ClassVar[int]
    user: UserInfo
    bytes_shipped: int
    def __init__(self, user: _Optional[_Union[UserInfo, _Mapping]] = ..., bytes_shipped: _Optional[int] = ...) -> None: ...

class SetNodeStateRequest(_message.Message):
    __slots__ = ("node_id", "state")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    state: NodeState
    def __init__(self, node_id: _Optional[str] = ..., state: _Optional[_Union[NodeState, str]] = ...) -> None: ...

class GetRoutingStatsRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class RoutingStats(_message.Message):
    __slots__ = ("histograms", "total")
    HISTOGRAMS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    histograms: _containers.RepeatedCompositeFieldContainer[RoutingHistogram]
    total: RoutingHistogram
    def __init__(self, histograms: _Optional[_Iterable[_Union[RoutingHistogram, _Mapping]]] = ..., total: _Optional[_Union[RoutingHistogram, _Mapping]] = ...) -> None: ...

class ResetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SoupRequest(_message.Message):
    __slots__ = ("node_id", "domain_weights", "sample_text")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_TEXT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    domain_weights: _containers.RepeatedScalarFieldContainer[float]
    sample_text: str
    def __init__(self, node_id: _Optional[str] = ..., domain_weights: _Optional[_Iterable[float]] = ..., sample_text: _Optional[str] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("node_id", "address", "model", "codec", "installed", "user_ids", "n_blocks", "n_experts", "protocol_version")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    INSTALLED_FIELD_NUMBER: _ClassVar[int]
    USER_IDS_FIELD_NUMBER: _ClassVar[int]
    N_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    N_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    model: str
    codec: str
    installed: _containers.RepeatedCompositeFieldContainer[BundleRef]
    user_ids: _containers.RepeatedScalarFieldContainer[str]
    n_blocks: int
    n_experts: int
    protocol_version: int
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., model: _Optional[str] = ..., codec: _Optional[str] = ..., installed: _Optional[_Iterable[_Union[BundleRef, _Mapping]]] = ..., user_ids: _Optional[_Iterable[str]] = ..., n_blocks: _Optional[int] = ..., n_experts: _Optional[int] = ..., protocol_version: _Optional[int] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("node_id", "heartbeat_interval_ms", "bundles", "user_ids", "chunk_size")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    BUNDLES_FIELD_NUMBER: _ClassVar[int]
    USER_IDS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    heartbeat_interval_ms: int
    bundles: _containers.RepeatedCompositeFieldContainer[BundleRef]
    user_ids: _containers.RepeatedScalarFieldContainer[str]
    chunk_size: int
    def __init__(self, node_id: _Optional[str] = ..., heartbeat_interval_ms: _Optional[int] = ..., bundles: _Optional[_Iterable[_Union[BundleRef, _Mapping]]] = ..., user_ids: _Optional[_Iterable[str]] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "state", "bundles", "user_ids", "expert_mask", "inflight")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BUNDLES_FIELD_NUMBER: _ClassVar[int]
    USER_IDS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_MASK_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    state: NodeState
    bundles: _containers.RepeatedScalarFieldContainer[str]
    user_ids: _containers.RepeatedScalarFieldContainer[str]
    expert_mask: bytes
    inflight: int
    def __init__(self, node_id: _Optional[str] = ..., state: _Optional[_Union[NodeState, str]] = ..., bundles: _Optional[_Iterable[str]] = ..., user_ids: _Optional[_Iterable[str]] = ..., expert_mask: _Optional[bytes] = ..., inflight: _Optional[int] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("bundles", "prefetch", "known")
    BUNDLES_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_FIELD_NUMBER: _ClassVar[int]
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    bundles: _containers.RepeatedCompositeFieldContainer[BundleRef]
    prefetch: _containers.RepeatedCompositeFieldContainer[ByteRange]
    known: bool
    def __init__(self, bundles: _Optional[_Iterable[_Union[BundleRef, _Mapping]]] = ..., prefetch: _Optional[_Iterable[_Union[ByteRange, _Mapping]]] = ..., known: _Optional[bool] = ...) -> None: ...

class FetchBundleRequest(_message.Message):
    __slots__ = ("node_id", "name", "offset", "length", "chunk_size", "expected_sha256")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SHA256_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    name: str
    offset: int
    length: int
    chunk_size: int
    expected_sha256: bytes
    def __init__(self, node_id: _Optional[str] = ..., name: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., chunk_size: _Optional[int] = ..., expected_sha256: _Optional[bytes] = ...) -> None: ...

class BundleChunk(_message.Message):
    __slots__ = ("name", "offset", "data", "total_size", "sha256", "model", "codec")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    data: bytes
    total_size: int
    sha256: bytes
    model: str
    codec: str
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_size: _Optional[int] = ..., sha256: _Optional[bytes] = ..., model: _Optional[str] = ..., codec: _Optional[str] = ...) -> None: ...

class FetchAdapterRequest(_message.Message):
    __slots__ = ("node_id", "user_id")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    user_id: str
    def __init__(self, node_id: _Optional[str] = ..., user_id: _Optional[str] = ...) -> None: ...

class RoutingHistogram(_message.Message):
    __slots__ = ("node_id", "n_blocks", "n_experts", "counts", "tokens")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    N_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    N_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    n_blocks: int
    n_experts: int
    counts: _containers.RepeatedScalarFieldContainer[int]
    tokens: int
    def __init__(self, node_id: _Optional[str] = ..., n_blocks: _Optional[int] = ..., n_experts: _Optional[int] = ..., counts: _Optional[_Iterable[int]] = ..., tokens: _Optional[int] = ...) -> None: ...

class RoutingReport(_message.Message):
    __slots__ = ("node_id", "histogram")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    histogram: RoutingHistogram
    def __init__(self, node_id: _Optional[str] = ..., histogram: _Optional[_Union[RoutingHistogram, _Mapping]] = ...) -> None: ...

class RoutingReportReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ScoreTokensRequest(_message.Message):
    __slots__ = ("token_ids", "user_id", "return_routes")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    RETURN_ROUTES_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    user_id: str
    return_routes: bool
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., user_id: _Optional[str] = ..., return_routes: _Optional[bool] = ...) -> None: ...

class ScoreTokensReply(_message.Message):
    __slots__ = ("logprobs", "node_id", "model", "routes")
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    node_id: str
    model: str
    routes: bytes
    def __init__(self, logprobs: _Optional[_Iterable[float]] = ..., node_id: _Optional[str] = ..., model: _Optional[str] = ..., routes: _Optional[bytes] = ...) -> None: ...

class NextTokenRequest(_message.Message):
    __slots__ = ("token_ids", "user_id", "top_k")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    user_id: str
    top_k: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., user_id: _Optional[str] = ..., top_k: _Optional[int] = ...) -> None: ...

class NextTokenReply(_message.Message):
    __slots__ = ("logprobs", "top_ids", "top_logprobs", "rest_logmass", "vocab_size", "node_id")
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    REST_LOGMASS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    top_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    rest_logmass: float
    vocab_size: int
    node_id: str
    def __init__(self, logprobs: _Optional[_Iterable[float]] = ..., top_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ..., rest_logmass: _Optional[float] = ..., vocab_size: _Optional[int] = ..., node_id: _Optional[str] = ...) -> None: ...

class NodeGenerateRequest(_message.Message):
    __slots__ = ("token_ids", "user_id", "max_new_tokens", "temperature", "top_k", "seed", "stop_ids")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    user_id: str
    max_new_tokens: int
    temperature: float
    top_k: int
    seed: int
    stop_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., user_id: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class NodeToken(_message.Message):
    __slots__ = ("token_id", "logprob", "finish_reason")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    finish_reason: FinishReason
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ...) -> None: ...

class LoadUserRequest(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: Adapter
    def __init__(self, adapter: _Optional[_Union[Adapter, _Mapping]] = ...) -> None: ...

class LoadUserReply(_message.Message):
    __slots__ = ("user_id", "bytes")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    bytes: int
    def __init__(self, user_id: _Optional[str] = ..., bytes: _Optional[int] = ...) -> None: ...

class UnloadUserRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class UnloadUserReply(_message.Message):
    __slots__ = ("unloaded",)
    UNLOADED_FIELD_NUMBER: _ClassVar[int]
    unloaded: bool
    def __init__(self, unloaded: _Optional[bool] = ...) -> None: ...

class InstallBundlesRequest(_message.Message):
    __slots__ = ("bundles", "ranges")
    BUNDLES_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    bundles: _containers.RepeatedCompositeFieldContainer[BundleRef]
    ranges: _containers.RepeatedCompositeFieldContainer[ByteRange]
    def __init__(self, bundles: _Optional[_Iterable[_Union[BundleRef, _Mapping]]] = ..., ranges: _Optional[_Iterable[_Union[ByteRange, _Mapping]]] = ...) -> None: ...

class InstallBundlesReply(_message.Message):
    __slots__ = ("installed", "bytes_fetched")
    INSTALLED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FETCHED_FIELD_NUMBER: _ClassVar[int]
    installed: _containers.RepeatedScalarFieldContainer[str]
    bytes_fetched: int
    def __init__(self, installed: _Optional[_Iterable[str]] = ..., bytes_fetched: _Optional[int] = ...) -> None: ...

class InstantiateSoupRequest(_message.Message):
    __slots__ = ("domain_weights", "sample_token_ids")
    DOMAIN_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    domain_weights: _containers.RepeatedScalarFieldContainer[float]
    sample_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, domain_weights: _Optional[_Iterable[float]] = ..., sample_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class InstantiateSoupReply(_message.Message):
    __slots__ = ("node_id", "bank", "domains", "domain_weights", "alpha", "model")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    BANK_FIELD_NUMBER: _ClassVar[int]
    DOMAINS_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    bank: str
    domains: _containers.RepeatedScalarFieldContainer[str]
    domain_weights: _containers.RepeatedScalarFieldContainer[float]
    alpha: _containers.RepeatedScalarFieldContainer[float]
    model: str
    def __init__(self, node_id: _Optional[str] = ..., bank: _Optional[str] = ..., domains: _Optional[_Iterable[str]] = ..., domain_weights: _Optional[_Iterable[float]] = ..., alpha: _Optional[_Iterable[float]] = ..., model: _Optional[str] = ...) -> None: ...

class NodeStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node_id", "state", "model", "bundles", "user_ids", "expert_mask", "n_blocks", "n_experts", "inflight", "routing", "bytes_received", "bytes_sent")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BUNDLES_FIELD_NUMBER: _ClassVar[int]
    USER_IDS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_MASK_FIELD_NUMBER: _ClassVar[int]
    N_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    N_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    state: NodeState
    model: str
    bundles: _containers.RepeatedScalarFieldContainer[str]
    user_ids: _containers.RepeatedScalarFieldContainer[str]
    expert_mask: bytes
    n_blocks: int
    n_experts: int
    inflight: int
    routing: RoutingHistogram
    bytes_received: int
    bytes_sent: int
    def __init__(self, node_id: _Optional[str] = ..., state: _Optional[_Union[NodeState, str]] = ..., model: _Optional[str] = ..., bundles: _Optional[_Iterable[str]] = ..., user_ids: _Optional[_Iterable[str]] = ..., expert_mask: _Optional[bytes] = ..., n_blocks: _Optional[int] = ..., n_experts: _Optional[int] = ..., inflight: _Optional[int] = ..., routing: _Optional[_Union[RoutingHistogram, _Mapping]] = ..., bytes_received: _Optional[int] = ..., bytes_sent: _Optional[int] = ...) -> None: ...
