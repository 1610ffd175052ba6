from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    UINT32: _ClassVar[DType]
    INT32: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    BOOL: _ClassVar[DType]

class LoadState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOAD_STATE_UNSPECIFIED: _ClassVar[LoadState]
    EMPTY: _ClassVar[LoadState]
    LOADING: _ClassVar[LoadState]
    READY: _ClassVar[LoadState]
    FAILED: _ClassVar[LoadState]

class Output(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_UNSPECIFIED: _ClassVar[Output]
    NONE: _ClassVar[Output]
    HIDDEN: _ClassVar[Output]
    LOGITS: _ClassVar[Output]
    TOKEN: _ClassVar[Output]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
UINT32: DType
INT32: DType
UINT8: DType
BOOL: DType
LOAD_STATE_UNSPECIFIED: LoadState
EMPTY: LoadState
LOADING: LoadState
READY: LoadState
FAILED: LoadState
OUTPUT_UNSPECIFIED: Output
NONE: Output
HIDDEN: Output
LOGITS: Output
TOKEN: Output

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("index", "data", "crc32")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    index: int
    data: bytes
    crc32: int
    def __init__(self, index: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32: _Optional[int] = ...) -> None: ...

class HandshakeRequest(_message.Message):
    __slots__ = ("protocol_version", "format_version", "model_identity", "compat_hash", "client_name", "will_load", "challenge")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    COMPAT_HASH_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    WILL_LOAD_FIELD_NUMBER: _ClassVar[int]
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    format_version: int
    model_identity: str
    compat_hash: str
    client_name: str
    will_load: bool
    challenge: str
    def __init__(self, protocol_version: _Optional[int] = ..., format_version: _Optional[int] = ..., model_identity: _Optional[str] = ..., compat_hash: _Optional[str] = ..., client_name: _Optional[str] = ..., will_load: _Optional[bool] = ..., challenge: _Optional[str] = ...) -> None: ...

class HandshakeReply(_message.Message):
    __slots__ = ("token", "protocol_version", "format_version", "compat_hash", "info", "node_proof", "node_id")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    COMPAT_HASH_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    NODE_PROOF_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    token: str
    protocol_version: int
    format_version: int
    compat_hash: str
    info: NodeInfo
    node_proof: str
    node_id: str
    def __init__(self, token: _Optional[str] = ..., protocol_version: _Optional[int] = ..., format_version: _Optional[int] = ..., compat_hash: _Optional[str] = ..., info: _Optional[_Union[NodeInfo, _Mapping]] = ..., node_proof: _Optional[str] = ..., node_id: _Optional[str] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "name", "backend", "memory_budget_bytes", "memory_used_bytes", "model_name", "model_identity", "layer_start", "layer_end", "num_layers_total", "is_first", "is_last", "hidden_size", "vocab_size", "sessions", "protocol_version", "format_version", "load_state", "load_fraction", "load_message", "weights_bytes", "max_context")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    IS_FIRST_FIELD_NUMBER: _ClassVar[int]
    IS_LAST_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOAD_STATE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FRACTION_FIELD_NUMBER: _ClassVar[int]
    LOAD_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    name: str
    backend: str
    memory_budget_bytes: int
    memory_used_bytes: int
    model_name: str
    model_identity: str
    layer_start: int
    layer_end: int
    num_layers_total: int
    is_first: bool
    is_last: bool
    hidden_size: int
    vocab_size: int
    sessions: int
    protocol_version: int
    format_version: int
    load_state: LoadState
    load_fraction: float
    load_message: str
    weights_bytes: int
    max_context: int
    def __init__(self, node_id: _Optional[str] = ..., name: _Optional[str] = ..., backend: _Optional[str] = ..., memory_budget_bytes: _Optional[int] = ..., memory_used_bytes: _Optional[int] = ..., model_name: _Optional[str] = ..., model_identity: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., num_layers_total: _Optional[int] = ..., is_first: _Optional[bool] = ..., is_last: _Optional[bool] = ..., hidden_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., sessions: _Optional[int] = ..., protocol_version: _Optional[int] = ..., format_version: _Optional[int] = ..., load_state: _Optional[_Union[LoadState, str]] = ..., load_fraction: _Optional[float] = ..., load_message: _Optional[str] = ..., weights_bytes: _Optional[int] = ..., max_context: _Optional[int] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ("model", "layer_start", "layer_end")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    model: str
    layer_start: int
    layer_end: int
    def __init__(self, model: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ...) -> None: ...

class LoadProgress(_message.Message):
    __slots__ = ("fraction", "stage", "message", "done", "info")
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    fraction: float
    stage: str
    message: str
    done: bool
    info: NodeInfo
    def __init__(self, fraction: _Optional[float] = ..., stage: _Optional[str] = ..., message: _Optional[str] = ..., done: _Optional[bool] = ..., info: _Optional[_Union[NodeInfo, _Mapping]] = ...) -> None: ...

class CacheConfig(_message.Message):
    __slots__ = ("k_bits", "v_bits", "fp16_layers", "quantized_start", "key_mean", "sinks", "window", "layer_bits")
    K_BITS_FIELD_NUMBER: _ClassVar[int]
    V_BITS_FIELD_NUMBER: _ClassVar[int]
    FP16_LAYERS_FIELD_NUMBER: _ClassVar[int]
    QUANTIZED_START_FIELD_NUMBER: _ClassVar[int]
    KEY_MEAN_FIELD_NUMBER: _ClassVar[int]
    SINKS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    LAYER_BITS_FIELD_NUMBER: _ClassVar[int]
    k_bits: int
    v_bits: int
    fp16_layers: int
    quantized_start: int
    key_mean: bool
    sinks: int
    window: int
    layer_bits: _containers.RepeatedCompositeFieldContainer[LayerBits]
    def __init__(self, k_bits: _Optional[int] = ..., v_bits: _Optional[int] = ..., fp16_layers: _Optional[int] = ..., quantized_start: _Optional[int] = ..., key_mean: _Optional[bool] = ..., sinks: _Optional[int] = ..., window: _Optional[int] = ..., layer_bits: _Optional[_Iterable[_Union[LayerBits, _Mapping]]] = ...) -> None: ...

class LayerBits(_message.Message):
    __slots__ = ("layer", "k_bits", "v_bits")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    K_BITS_FIELD_NUMBER: _ClassVar[int]
    V_BITS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    k_bits: int
    v_bits: int
    def __init__(self, layer: _Optional[int] = ..., k_bits: _Optional[int] = ..., v_bits: _Optional[int] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("temperature", "top_p", "seed", "top_k", "min_p", "min_tokens_to_keep", "repetition_penalty", "repetition_context_size", "presence_penalty", "frequency_penalty", "penalty_context_size")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_TO_KEEP_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPETITION_CONTEXT_SIZE_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PENALTY_CONTEXT_SIZE_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    seed: int
    top_k: int
    min_p: float
    min_tokens_to_keep: int
    repetition_penalty: float
    repetition_context_size: int
    presence_penalty: float
    frequency_penalty: float
    penalty_context_size: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., min_tokens_to_keep: _Optional[int] = ..., repetition_penalty: _Optional[float] = ..., repetition_context_size: _Optional[int] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., penalty_context_size: _Optional[int] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("session_id", "max_context", "cache", "next_address", "sampling")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    NEXT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    max_context: int
    cache: CacheConfig
    next_address: str
    sampling: Sampling
    def __init__(self, session_id: _Optional[str] = ..., max_context: _Optional[int] = ..., cache: _Optional[_Union[CacheConfig, _Mapping]] = ..., next_address: _Optional[str] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "offset", "max_context", "cache", "kv_bytes_reserved", "kv_bytes_used", "next_address", "created_unix", "pending_token")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_RESERVED_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    NEXT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    PENDING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    offset: int
    max_context: int
    cache: CacheConfig
    kv_bytes_reserved: int
    kv_bytes_used: int
    next_address: str
    created_unix: float
    pending_token: int
    def __init__(self, session_id: _Optional[str] = ..., offset: _Optional[int] = ..., max_context: _Optional[int] = ..., cache: _Optional[_Union[CacheConfig, _Mapping]] = ..., kv_bytes_reserved: _Optional[int] = ..., kv_bytes_used: _Optional[int] = ..., next_address: _Optional[str] = ..., created_unix: _Optional[float] = ..., pending_token: _Optional[int] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("session_id", "tokens", "hidden", "want", "expected_position", "step_id", "holder", "context_ids")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    WANT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_POSITION_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_IDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    tokens: TokenIds
    hidden: Tensor
    want: Output
    expected_position: int
    step_id: str
    holder: str
    context_ids: TokenIds
    def __init__(self, session_id: _Optional[str] = ..., tokens: _Optional[_Union[TokenIds, _Mapping]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., want: _Optional[_Union[Output, str]] = ..., expected_position: _Optional[int] = ..., step_id: _Optional[str] = ..., holder: _Optional[str] = ..., context_ids: _Optional[_Union[TokenIds, _Mapping]] = ...) -> None: ...

class ForwardChunk(_message.Message):
    __slots__ = ("header", "payload_bytes", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ForwardRequest
    payload_bytes: int
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[ForwardRequest, _Mapping]] = ..., payload_bytes: _Optional[int] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class Hop(_message.Message):
    __slots__ = ("node_id", "compute_ms", "total_ms", "bytes_in")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    compute_ms: float
    total_ms: float
    bytes_in: int
    def __init__(self, node_id: _Optional[str] = ..., compute_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., bytes_in: _Optional[int] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("offset", "hidden", "logits", "token", "hops")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    offset: int
    hidden: Tensor
    logits: Tensor
    token: int
    hops: _containers.RepeatedCompositeFieldContainer[Hop]
    def __init__(self, offset: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., logits: _Optional[_Union[Tensor, _Mapping]] = ..., token: _Optional[int] = ..., hops: _Optional[_Iterable[_Union[Hop, _Mapping]]] = ...) -> None: ...

class TrimRequest(_message.Message):
    __slots__ = ("session_id", "count", "holder")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    count: int
    holder: str
    def __init__(self, session_id: _Optional[str] = ..., count: _Optional[int] = ..., holder: _Optional[str] = ...) -> None: ...

class DropSessionRequest(_message.Message):
    __slots__ = ("session_id", "holder", "moved_to")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    MOVED_TO_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    holder: str
    moved_to: str
    def __init__(self, session_id: _Optional[str] = ..., holder: _Optional[str] = ..., moved_to: _Optional[str] = ...) -> None: ...

class DropSessionReply(_message.Message):
    __slots__ = ("bytes_freed", "next_address")
    BYTES_FREED_FIELD_NUMBER: _ClassVar[int]
    NEXT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    bytes_freed: int
    next_address: str
    def __init__(self, bytes_freed: _Optional[int] = ..., next_address: _Optional[str] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MetricsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MetricsReply(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class ListSessionsReply(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionInfo]
    def __init__(self, sessions: _Optional[_Iterable[_Union[SessionInfo, _Mapping]]] = ...) -> None: ...

class ExportSessionRequest(_message.Message):
    __slots__ = ("session_id", "layer_start", "layer_end", "keep_prefill", "from_token", "holder")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    KEEP_PREFILL_FIELD_NUMBER: _ClassVar[int]
    FROM_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    layer_start: int
    layer_end: int
    keep_prefill: bool
    from_token: int
    holder: str
    def __init__(self, session_id: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., keep_prefill: _Optional[bool] = ..., from_token: _Optional[int] = ..., holder: _Optional[str] = ...) -> None: ...

class SessionHeader(_message.Message):
    __slots__ = ("total_bytes", "session_id", "next_address", "model_identity", "layer_start", "layer_end", "num_tokens", "format_version", "container_version", "cache", "stage", "append")
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NEXT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_VERSION_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    APPEND_FIELD_NUMBER: _ClassVar[int]
    total_bytes: int
    session_id: str
    next_address: str
    model_identity: str
    layer_start: int
    layer_end: int
    num_tokens: int
    format_version: int
    container_version: int
    cache: CacheConfig
    stage: bool
    append: bool
    def __init__(self, total_bytes: _Optional[int] = ..., session_id: _Optional[str] = ..., next_address: _Optional[str] = ..., model_identity: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., num_tokens: _Optional[int] = ..., format_version: _Optional[int] = ..., container_version: _Optional[int] = ..., cache: _Optional[_Union[CacheConfig, _Mapping]] = ..., stage: _Optional[bool] = ..., append: _Optional[bool] = ...) -> None: ...

class SessionChunk(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: SessionHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[SessionHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class PushSessionRequest(_message.Message):
    __slots__ = ("session_id", "layer_start", "layer_end", "target_address", "target_session_id", "next_address", "keep_prefill", "stage", "from_token", "holder")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    TARGET_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TARGET_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NEXT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KEEP_PREFILL_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    FROM_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    layer_start: int
    layer_end: int
    target_address: str
    target_session_id: str
    next_address: str
    keep_prefill: bool
    stage: bool
    from_token: int
    holder: str
    def __init__(self, session_id: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., target_address: _Optional[str] = ..., target_session_id: _Optional[str] = ..., next_address: _Optional[str] = ..., keep_prefill: _Optional[bool] = ..., stage: _Optional[bool] = ..., from_token: _Optional[int] = ..., holder: _Optional[str] = ...) -> None: ...

class PushSessionReply(_message.Message):
    __slots__ = ("session", "container_bytes", "export_ms", "transfer_ms")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXPORT_MS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_MS_FIELD_NUMBER: _ClassVar[int]
    session: SessionInfo
    container_bytes: int
    export_ms: float
    transfer_ms: float
    def __init__(self, session: _Optional[_Union[SessionInfo, _Mapping]] = ..., container_bytes: _Optional[int] = ..., export_ms: _Optional[float] = ..., transfer_ms: _Optional[float] = ...) -> None: ...

class RerouteSessionRequest(_message.Message):
    __slots__ = ("session_id", "next_address", "holder")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NEXT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    next_address: str
    holder: str
    def __init__(self, session_id: _Optional[str] = ..., next_address: _Optional[str] = ..., holder: _Optional[str] = ...) -> None: ...

class LockSessionRequest(_message.Message):
    __slots__ = ("session_id", "holder", "unlock", "ttl_s")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    UNLOCK_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    holder: str
    unlock: bool
    ttl_s: float
    def __init__(self, session_id: _Optional[str] = ..., holder: _Optional[str] = ..., unlock: _Optional[bool] = ..., ttl_s: _Optional[float] = ...) -> None: ...

class LockSessionReply(_message.Message):
    __slots__ = ("holder", "expires_in_s", "session")
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    holder: str
    expires_in_s: float
    session: SessionInfo
    def __init__(self, holder: _Optional[str] = ..., expires_in_s: _Optional[float] = ..., session: _Optional[_Union[SessionInfo, _Mapping]] = ...) -> None: ...
